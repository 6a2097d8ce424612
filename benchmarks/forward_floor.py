"""The arithmetic floor of one prediction: the CPU time of the forward alone, per image, with no HTTP, JSON or
decoding around it, to set beside the server's CPU per predict (``load_test.py``).

Four ways, each for batches of ``--batches`` images (real CIFAR-100 test images of the query's classes), in this
one process, on ``--threads`` torch threads (default 1, as the service runs a batch of 8 or fewer), fp32:

- library: the served library alone (the part every query shares, most of the arithmetic);
- modules: the served library and the query's experts as the batcher runs them (``served``: BatchNorm folded,
  channels_last), on already normalised images: the network's arithmetic and torch's per-operation dispatch;
- one request: the service's ``forward`` for one request of B images, plus ``answer`` (the top-k rows the
  response is made of): what the batcher thread does for a lone request;
- B requests: the same for B requests of one image each, as the batcher sees concurrent clients.

Each figure is the median over ``--repeats`` calls (after a warm-up) of the calling thread's CPU time
(``time.thread_time``) and of the wall time, divided by B; the variants alternate call by call, so that drift of the
machine hits them alike. Multiply-adds per image are the query's (``TaskModel.cost``).

    python benchmarks/forward_floor.py --data_root ../shared/data [--tasks people vehicles_1 vehicles_2] [--engine onnx]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.data import Normalizer
from PoE.core.paths import DATA_ROOT_HELP, default_data_root
from PoE.core.precision import cpu_model
from PoE.query.pool import Pool
from PoE.query.service.batching import ExportGate, Job, answer, forward, served
from PoE.query.service.engine import Engine

README_QUERY = ["people", "vehicles_1", "vehicles_2"]


def variants(pool: Pool, tasks: list[str], x: torch.Tensor, engine: Engine | None) -> dict[str, Callable[[], object]]:
    """The ways of running the forward of ``x`` (float RGB in [0, 1], B x 3 x S x S)."""
    model = pool.query(tasks)
    run = served(pool, engine)
    experts = [run.expert(pool, t) for t in model.tasks]
    normed = Normalizer(pool.cfg.mean, pool.cfg.std, pool.device)(x).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def library() -> object:
        return run.run(run.library, normed)

    @torch.inference_mode()
    def modules() -> object:
        features = run.run(run.library, normed)
        return [run.run(e, features) for e in experts]

    def one_request() -> object:
        return [answer(p, 5) for p in forward(pool, [Job(model, x)], engine)]

    def many_requests() -> object:
        return [answer(p, 5) for p in forward(pool, [Job(model, x[i : i + 1]) for i in range(len(x))], engine)]

    out = {"library": library, "modules": modules, "one request": one_request}
    if len(x) > 1:
        out[f"{len(x)} requests"] = many_requests
    return out


def warm(pool: Pool, tasks: list[str], calls: dict[str, Callable[[], object]], engine: Engine | None) -> None:
    """First-call costs (the served copies, allocator, oneDNN primitives); with an engine, until every module
    runs as its onnxruntime session."""
    for call in calls.values():
        for _ in range(5 if engine is None else engine.after + 1):
            call()
    run, deadline = served(pool, engine), time.monotonic() + 300
    while engine is not None and len(run.sessions) < 1 + len(tasks):
        if time.monotonic() > deadline:
            raise SystemExit("the onnxruntime sessions were not made within 300 s")
        time.sleep(0.1)


def measure(
    calls: dict[str, Callable[[], object]], repeats: int, idle_ms: float = 0.0
) -> dict[str, tuple[float, float]]:
    """(thread CPU ms, wall ms) per call, medians; the calls alternate, each after ``idle_ms`` of sleep."""
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    wall: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            if idle_ms:
                time.sleep(idle_ms / 1e3)
            c, w = time.thread_time(), time.perf_counter()
            call()
            cpu[name].append((time.thread_time() - c) * 1e3)
            wall[name].append((time.perf_counter() - w) * 1e3)
    return {name: (statistics.median(cpu[name]), statistics.median(wall[name])) for name in calls}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="DB_PoE", help="the pool folder")
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument("--tasks", nargs="+", default=README_QUERY, help="the query (default: the README's)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 16], help="images per forward")
    p.add_argument("--repeats", type=int, default=200, help="timed calls of each variant per batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument(
        "--idle_ms",
        type=float,
        default=0.0,
        help="sleep this long before each timed call, as a server's batcher idles between lone requests",
    )
    p.add_argument(
        "--engine", choices=["torch", "onnx"], default="torch", help="how the modules run (the server's --engine)"
    )
    a = p.parse_args(argv)
    if a.repeats < 1 or a.threads < 1 or min(a.batches) < 1:
        p.error("--repeats, --threads and every --batches value must be 1 or more")
    if not 0 <= a.idle_ms <= 1000:
        p.error(f"--idle_ms must be 0 to 1000 milliseconds, got {a.idle_ms:g}")
    torch.set_num_threads(a.threads)
    pool = Pool.open(a.db, "cifar100", device="cpu", precision="fp32")
    model = pool.query(a.tasks)
    d = np.load(Path(a.data_root) / "cifar100" / "test.npz")
    keep = np.flatnonzero(np.isin(d["y"], model.classes))[: max(a.batches)]
    images = torch.from_numpy(d["x"][keep]).permute(0, 3, 1, 2).float().div(255)
    if len(images) < max(a.batches):
        p.error(f"only {len(images)} test images of the query's classes; ask for smaller --batches")
    macs = model.cost()[0]
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"query {' '.join(model.tasks)}: {macs:,} multiply-adds per image\n")
    print("| batch B | way | thread CPU per image | wall per image |\n| --- | --- | --- | --- |")
    engine = Engine(ExportGate(), a.threads) if a.engine == "onnx" else None
    for b in a.batches:
        calls = variants(pool, model.tasks, images[:b], engine)
        warm(pool, model.tasks, calls, engine)
        for name, (cpu, wall) in measure(calls, a.repeats, a.idle_ms).items():
            print(f"| {b} | {name} | {cpu / b:.3f} ms | {wall / b:.3f} ms |", flush=True)
    end = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{cpu_model()}; torch {torch.__version__}, engine {a.engine}, {a.threads} thread(s), "
        f"idle {a.idle_ms:g} ms before each call, fp32, pool {pool.root} "
        f"({pool.digest[:16]}); medians of {a.repeats} calls; load average {load} before, {end} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
