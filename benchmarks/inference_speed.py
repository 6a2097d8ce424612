"""Images per second of a consolidated model, five ways, for queries of n = 1, 3, 5 and 20 tasks.

- reference: the original code's shape of the service: NCHW fp32, the library, then a Python loop over the
  experts, their logits concatenated and reordered;
- fp32 / bf16: this project's model as ``TaskModel`` runs it (channels_last; bf16 = bfloat16 autocast);
- export / export bf16: the ``.pt2`` written by ``TaskModel.export`` (``--export_precision fp32 | bf16``),
  loaded with ``torch.export.load(...).module()``, fed [0, 1] RGB as its contract says.

Every variant scores the same composite test images (real CIFAR-100) in batches of ``--batch``; each time is
the median of ``--repeats`` passes after a warm-up pass, all in this one process, alternating variants so
that drift of the machine hits them alike. Agreement = share of images whose argmax equals the reference's.

    python benchmarks/inference_speed.py --data_root ../shared/data [--db DB_PoE] [--out results/inference.md]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.datasets import load_split
from PoE.core.paths import DATA_ROOT_HELP, default_data_root
from PoE.core.precision import cpu_model
from PoE.query.pool import Pool

QUERIES = {
    1: ["people"],
    3: ["people", "vehicles_1", "vehicles_2"],
    5: ["large_omnivores_and_herbivores", "medium-sized_mammals", "people", "small_mammals", "vehicles_1"],
}


def plain(module: torch.nn.Module) -> torch.nn.Module:
    """A copy in PyTorch's default (contiguous, NCHW) layout, as the original code keeps its modules."""
    return copy.deepcopy(module).to(memory_format=torch.contiguous_format)


def reference(pool: Pool, tasks: list[str]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The original code's service loop: normalise, library, each expert, concatenate, reorder (NCHW fp32)."""
    query = pool.make_query(tasks)
    library = plain(pool.library)
    experts = [plain(pool.experts[t]) for t in query.tasks]
    order = torch.tensor(query.order)
    mean = torch.tensor(pool.cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(pool.cfg.std).view(1, 3, 1, 1)

    def run(x: torch.Tensor) -> torch.Tensor:
        features = library((x - mean) / std)
        return torch.cat([e(features) for e in experts], 1)[:, order]

    return run


def direct(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """A TaskModel's own path (channels_last, its precision's autocast) without the input checks of predict."""
    from PoE.core.precision import autocast

    def run(x: torch.Tensor) -> torch.Tensor:
        x = ((x - model.mean) / model.std).contiguous(memory_format=torch.channels_last)
        with autocast("cpu", model.precision):
            return model.module(x).float()

    return run


def timed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    """Seconds for one pass over ``x`` and the argmax of every row."""
    preds = []
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(x), batch):
            preds.append(fn(x[s : s + batch]).argmax(1))
    return time.perf_counter() - t0, torch.cat(preds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--n", nargs="+", type=int, default=[1, 3, 5, 20], choices=[1, 3, 5, 20])
    p.add_argument("--out", default=None, help="also write the table (Markdown) here")
    args = p.parse_args()
    torch.manual_seed(0)
    pool = Pool.open(args.db, device="cpu")
    test = load_split(pool.cfg, args.data_root, "test")
    names = ["reference", "fp32", "bf16", "export", "export bf16"]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="poe-bench-"))
    for n in args.n:
        tasks = QUERIES.get(n, list(pool.cfg.tasks))
        fp32, bf16 = pool.query(tasks), Pool.open(args.db, device="cpu", precision="bf16").query(tasks)
        images, _ = test.with_classes(fp32.classes)
        x = images.x.float().div(255)  # [0, 1] RGB, N x 3 x 32 x 32, as every variant's contract takes it
        fp32.export(tmp / f"n{n}.pt2")
        fp32.export(tmp / f"n{n}_bf16.pt2", precision="bf16")
        variants = {
            "reference": reference(pool, tasks),
            "fp32": direct(fp32),
            "bf16": direct(bf16),
            "export": torch.export.load(str(tmp / f"n{n}.pt2")).module(),
            "export bf16": torch.export.load(str(tmp / f"n{n}_bf16.pt2")).module(),
        }
        seconds: dict[str, list[float]] = {k: [] for k in names}
        preds: dict[str, torch.Tensor] = {}
        for k in names:  # warm-up (and the predictions compared below)
            preds[k] = timed(variants[k], x, args.batch)[1]
        for _ in range(args.repeats):
            for k in names:
                seconds[k].append(timed(variants[k], x, args.batch)[0])
        row = {"n": n, "images": len(x)}
        for k in names:
            row[k] = len(x) / statistics.median(seconds[k])
            row[f"{k} agrees"] = float((preds[k] == preds["reference"]).float().mean()) * 100
        rows.append(row)
        print(f"n={n}: " + ", ".join(f"{k} {row[k]:.0f} img/s" for k in names), flush=True)
    head = "| n | images | " + " | ".join(f"{k} (img/s)" for k in names)
    head += " | speed-up of export / best | agreement with reference (%) |"
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for r in rows:
        best = max(r[k] for k in names[1:])
        agree = ", ".join(f"{k} {r[f'{k} agrees']:.2f}" for k in names[1:])
        speed = f"{r['export'] / r['reference']:.2f}x / {best / r['reference']:.2f}x"
        lines.append(
            f"| {r['n']} | {r['images']} | " + " | ".join(f"{r[k]:,.0f}" for k in names) + f" | {speed} | {agree} |"
        )
    table = (
        f"CPU: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"median of {args.repeats} passes\n\n" + "\n".join(lines)
    )
    print("\n" + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
