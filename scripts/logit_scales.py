"""Why a pool's experts do or do not combine: each expert's largest logit on its own task's test images and on the
other queried tasks' images. Consolidation takes the argmax over every expert's logits, so an expert whose logits
run larger on foreign images than another expert's run on that expert's own images takes those images away
(a cross-expert error).

    python scripts/logit_scales.py --data_root ../shared/data --db DB_PoE DB_ablation/soft DB_ablation/scale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.data import ImageSet, Normalizer
from PoE.datasets import get_dataset, load_split
from PoE.evaluate import expert_outputs
from PoE.experiments import write_text
from PoE.pool import read_expert, read_library
from PoE.store import PoolPaths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--db", nargs="+", default=["DB_PoE"], help="pool roots; each pool is <db>/cifar100/")
    p.add_argument("--data_root", default="data", help="folder holding cifar100/ (default: data)")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="the experts to compare (default: the "
                   "six default tasks)")  # fmt: skip
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    a = p.parse_args()
    cfg = get_dataset("cifar100")
    a.tasks = a.tasks or cfg.default_tasks
    unknown = sorted(set(a.tasks) - set(cfg.tasks))
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; accepted: {', '.join(sorted(cfg.tasks))}")
    test = load_split("cifar100", a.data_root, "test", progress=False)
    keep = torch.isin(test.y, torch.tensor([c for t in a.tasks for c in cfg.tasks[t]]))
    images = ImageSet(test.x[keep], test.y[keep])
    rows = ["| pool | expert | task accuracy (%) | mean max logit, own images | mean max logit, other tasks' images |",
            "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for db in a.db:
        paths = PoolPaths(Path(db) / cfg.name, cfg.tag)
        library, meta = read_library(paths, cfg)
        experts = {t: read_expert(paths, cfg, t, library, meta)[0] for t in a.tasks}
        logits = expert_outputs(library, experts, images, Normalizer(cfg.mean, cfg.std, "cpu"), "cpu")
        for t in a.tasks:
            classes = torch.tensor(cfg.tasks[t])
            own = torch.isin(images.y, classes)
            top, arg = logits[t].max(1)
            acc = 100 * (classes[arg[own]] == images.y[own]).float().mean()
            rows.append(f"| {db} | {t} | {acc:.2f} | {top[own].mean():.2f} | {top[~own].mean():.2f} |")
    table = "\n".join(rows) + "\n"
    print(table, end="")
    if a.out:
        write_text(a.out, table)


if __name__ == "__main__":
    main()
