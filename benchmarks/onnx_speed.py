"""CPU speed of a consolidated model four ways, for queries of 1, 3 and 20 tasks on the shipped pool:

- PyTorch eager: the model as ``TaskModel`` runs it (normalise, channels_last, fp32);
- .pt2: ``TaskModel.export`` 's torch.export program, ``torch.export.load(...).module()``;
- ONNX fp32 and ONNX int8 (``--quantize int8``): onnxruntime, CPU execution provider.

Batch-1 latency (p50 / p99 over ``--latency_runs`` single images) and batch-256 throughput (median of ``--repeats``
passes), the four variants alternating so that drift of the machine hits them alike; every variant gets all the
cores (``--threads``). With ``--op_profile``, onnxruntime's own per-operator time of the 3-task model at batch 256,
fp32 against int8: where int8 time goes. The load average is printed before and after: on a shared machine the
numbers hold only beside it.

    python benchmarks/onnx_speed.py --data_root ../shared/data --op_profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.datasets import load_split
from PoE.core.precision import cpu_model
from PoE.query.model import TaskModel
from PoE.query.onnx_export import INPUT
from PoE.query.pool import Pool

QUERIES = {1: ["people"], 3: ["people", "vehicles_1", "vehicles_2"]}
VARIANTS = ["PyTorch eager", ".pt2", "ONNX fp32", "ONNX int8"]


def eager(model: TaskModel) -> Callable[[np.ndarray], np.ndarray]:
    mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.cfg.std).view(1, 3, 1, 1)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            t = ((torch.from_numpy(x) - mean) / std).contiguous(memory_format=torch.channels_last)
            return model.module(t).numpy()

    return run


def program(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    module = torch.export.load(str(path)).module()

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()

    return run


def session(path: Path, threads: int, profile: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = profile
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    s = session(path, threads)
    return lambda x: s.run(None, {INPUT: x})[0]


def measure(runners: dict[str, Callable], one: np.ndarray, batch: np.ndarray, runs: int, repeats: int) -> dict:
    """Latency of single images and throughput at ``len(batch)``, variants alternating."""
    lat: dict[str, list[float]] = {k: [] for k in runners}
    thr: dict[str, list[float]] = {k: [] for k in runners}
    for fn in runners.values():  # warm-up
        fn(one), fn(batch)
    for i in range(runs):
        for k, fn in runners.items():
            x = one[i % len(one) : i % len(one) + 1]
            t0 = time.perf_counter()
            fn(x)
            lat[k].append(time.perf_counter() - t0)
    for _ in range(repeats):
        for k, fn in runners.items():
            t0 = time.perf_counter()
            fn(batch)
            thr[k].append(time.perf_counter() - t0)
    out = {}
    for k in runners:
        ms = np.array(lat[k]) * 1e3
        out[k] = {
            "p50": float(np.percentile(ms, 50)),
            "p99": float(np.percentile(ms, 99)),
            "img_s": len(batch) / statistics.median(thr[k]),
        }
    return out


def op_profile(paths: dict[str, Path], batch: np.ndarray, threads: int) -> None:
    """onnxruntime's per-operator kernel time, fp32 against int8 (batch ``len(batch)``; the mean of 6 runs)."""
    print(f"\nonnxruntime per-operator time, 3-task model, batch {len(batch)} (ms per run, share):")
    for name, path in paths.items():
        s = session(path, threads, profile=True)
        for _ in range(6):
            s.run(None, {INPUT: batch})
        trace = Path(s.end_profiling())
        events = json.loads(trace.read_text())
        trace.unlink()
        per_op: collections.Counter = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / 6
        total = sum(per_op.values())
        ops = ", ".join(f"{op} {ms:.1f} ({100 * ms / total:.0f}%)" for op, ms in per_op.most_common(7))
        print(f"- {name}: {total:.1f} ms: {ops}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--data_root", default="data")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--latency_runs", type=int, default=300)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--op_profile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    pool = Pool.open(a.db, device="cpu")
    test = load_split(pool.cfg, a.data_root, "test", progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="poe-onnx-bench-"))
    rows = {}
    for n in (1, 3, 20):
        model = pool.query(QUERIES.get(n, list(pool.cfg.tasks)))
        images, _ = test.with_classes(model.classes)
        x = (images.x.float() / 255).numpy()
        batch = np.ascontiguousarray(np.resize(x, (a.batch, *x.shape[1:])))
        model.export(tmp / f"n{n}.pt2")
        model.export(tmp / f"n{n}.onnx")
        model.export(tmp / f"n{n}_int8.onnx", quantize="int8", data_root=a.data_root)
        runners = {
            "PyTorch eager": eager(model),
            ".pt2": program(tmp / f"n{n}.pt2"),
            "ONNX fp32": onnx_runner(tmp / f"n{n}.onnx", a.threads),
            "ONNX int8": onnx_runner(tmp / f"n{n}_int8.onnx", a.threads),
        }
        rows[n] = measure(runners, x[:64], batch, a.latency_runs, a.repeats)
        print(f"n={n}: " + ", ".join(f"{k} {v['img_s']:.0f} img/s" for k, v in rows[n].items()), flush=True)
    load_after = os.getloadavg()
    print(
        f"\nCPU: {cpu_model()}, {os.cpu_count()} cores, {a.threads} threads each; torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}; load average (1/5/15 min) {' / '.join(f'{v:.2f}' for v in load_before)} "
        f"before, {' / '.join(f'{v:.2f}' for v in load_after)} after\n"
    )
    print("| tasks | variant | batch-1 p50 (ms) | batch-1 p99 (ms) | batch-256 (img/s) | throughput vs eager |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n, r in rows.items():
        for k in VARIANTS:
            v = r[k]
            ratio = v["img_s"] / r["PyTorch eager"]["img_s"]
            print(f"| {n} | {k} | {v['p50']:.2f} | {v['p99']:.2f} | {v['img_s']:,.0f} | {ratio:.2f}x |")
    speed = [f"{n} tasks {r['ONNX int8']['img_s'] / r['ONNX fp32']['img_s']:.2f}x" for n, r in rows.items()]
    size = [
        f"{n} tasks {100 * (tmp / f'n{n}_int8.onnx').stat().st_size / (tmp / f'n{n}.onnx').stat().st_size:.1f}%"
        for n in rows
    ]
    print(f"\nint8 / fp32 ONNX at batch {a.batch}: {', '.join(speed)}; file size int8 / fp32: {', '.join(size)}")
    if a.op_profile:
        test3 = test.with_classes(pool.query(QUERIES[3]).classes)[0]
        x = (test3.x[: a.batch].float() / 255).numpy()
        op_profile({"fp32": tmp / "n3.onnx", "int8": tmp / "n3_int8.onnx"}, x, a.threads)


if __name__ == "__main__":
    main()
