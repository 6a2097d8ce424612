"""int8 ONNX accuracy against fp32: how many calibration images it needs, and every combination of the default tasks.

    python benchmarks/onnx_accuracy.py --data_root ../shared/data

1. The README query (people, vehicles_1, vehicles_2): int8 accuracy by number of calibration images (seeded
   samples of its classes' training images, several seeds each), against fp32 ONNX and PyTorch.
2. Every combination of n = 2 .. 5 of the six default tasks (Run_Evaluation.py's default: 15 + 20 + 15 + 6 = 56), at
   the default calibration (``PoE.query.onnx_export.CALIBRATION_IMAGES``, seed 0): PyTorch, fp32 ONNX, int8 ONNX and
   file sizes, per n and over all 56. Prints markdown tables (docs/onnx.md).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.datasets import load_split
from PoE.core.datasets.cifar100 import DEFAULT_TASKS
from PoE.query import onnx_export as E
from PoE.query.pool import Pool


def session_accuracy(data: bytes, x: np.ndarray, labels: np.ndarray) -> float:
    s = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = np.concatenate([s.run(None, {E.INPUT: x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    return 100.0 * float((out.argmax(1) == labels).mean())


def int8_bytes(proto, images: np.ndarray, reduce_range: bool = True) -> bytes:
    q = E.quantize_int8(proto, images, reduce_range=reduce_range)
    E.compact(q)
    return q.SerializeToString()


def fp32_bytes(proto) -> bytes:
    p = type(proto)()
    p.CopyFrom(proto)
    E.compact(p)
    return p.SerializeToString()


def sweep(pool: Pool, test, data_root: str, counts: list[int], seeds: list[int]) -> None:
    model = pool.query(["people", "vehicles_1", "vehicles_2"])
    subset, labels = test.with_classes(model.classes)
    x, y = (subset.x.float() / 255).numpy(), labels.numpy()
    proto = E.onnx_proto(model)
    fp32 = session_accuracy(fp32_bytes(proto), x, y)
    print(f"README query: PyTorch {model.accuracy(test)[0]:.2f}%, fp32 ONNX {fp32:.2f}%")
    print("\n| calibration images | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    print("| ---: | " + " | ".join("---:" for _ in seeds) + " | ---: |")
    for n in counts:
        accs = [session_accuracy(int8_bytes(proto, E.calibration_images(model, data_root, n, s)), x, y) for s in seeds]
        print(f"| {n} | " + " | ".join(f"{a:.2f}" for a in accs) + f" | {np.mean(accs):.2f} |", flush=True)
    full = session_accuracy(int8_bytes(proto, E.calibration_images(model, data_root), reduce_range=False), x, y)
    print(f"\n8-bit weights (reduce_range off), {E.CALIBRATION_IMAGES} images, seed {E.CALIBRATION_SEED}: {full:.2f}%")


def combinations(pool: Pool, test, data_root: str) -> None:
    rows = []
    print("\n| n | tasks | PyTorch | ONNX fp32 | ONNX int8 | int8 - fp32 | size int8 / fp32 |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in range(2, len(DEFAULT_TASKS)):
        for tasks in itertools.combinations(DEFAULT_TASKS, n):
            model = pool.query(list(tasks))
            subset, labels = test.with_classes(model.classes)
            x, y = (subset.x.float() / 255).numpy(), labels.numpy()
            proto = E.onnx_proto(model)
            fp32 = fp32_bytes(proto)
            int8 = int8_bytes(proto, E.calibration_images(model, data_root))
            row = (
                n,
                model.accuracy(test)[0],
                session_accuracy(fp32, x, y),
                session_accuracy(int8, x, y),
                len(int8) / len(fp32),
            )
            rows.append(row)
            print(
                f"| {n} | {' '.join(tasks)} | {row[1]:.2f} | {row[2]:.2f} | {row[3]:.2f} | {row[3] - row[2]:+.2f} | "
                f"{100 * row[4]:.1f}% |",
                flush=True,
            )
    a = np.array(rows)
    print("\n| n | combinations | PyTorch | ONNX fp32 | ONNX int8 | int8 - fp32 (mean, worst) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in sorted(set(a[:, 0])):
        b = a[a[:, 0] == n]
        d = b[:, 3] - b[:, 2]
        print(
            f"| {int(n)} | {len(b)} | {b[:, 1].mean():.2f} | {b[:, 2].mean():.2f} | {b[:, 3].mean():.2f} | "
            f"{d.mean():+.2f}, {d.min():+.2f} |"
        )
    d = a[:, 3] - a[:, 2]
    print(
        f"| all | {len(a)} | {a[:, 1].mean():.2f} | {a[:, 2].mean():.2f} | {a[:, 3].mean():.2f} | "
        f"{d.mean():+.2f}, {d.min():+.2f} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--data_root", default="data")
    p.add_argument("--counts", nargs="+", type=int, default=[16, 32, 64, 128, 256, 512, 1024, 2048])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--skip", choices=("sweep", "combinations"), default=None)
    a = p.parse_args()
    t0 = time.time()
    pool = Pool.open(a.db)
    test = load_split("cifar100", a.data_root, "test", progress=False)
    if a.skip != "sweep":
        sweep(pool, test, a.data_root, a.counts, a.seeds)
    if a.skip != "combinations":
        combinations(pool, test, a.data_root)
    print(f"\n{time.time() - t0:.0f} s; onnxruntime {ort.__version__}")


if __name__ == "__main__":
    main()
