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

from PoE.cli.common import run_main
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import get_dataset, load_split
from PoE.core.evaluate import consolidated_logits
from PoE.core.paths import DATA_ROOT_HELP, default_data_root
from PoE.core.runtime import CPU
from PoE.experiments import write_text
from PoE.query.pool import Pool


def table(dbs: list[str], data_root: str, tasks: list[str] | None) -> str:
    """The markdown table over the pools ``dbs`` (each checked as the service checks it) and ``tasks``."""
    cfg = get_dataset("cifar100")
    tasks = tasks or cfg.default_tasks
    pools = [Pool.open(db) for db in dbs]
    classes = pools[0].make_query(tasks).classes  # unknown, repeated or missing tasks: one line naming them
    test = load_split("cifar100", data_root, "test", progress=False)
    keep = torch.isin(test.y, torch.tensor(classes))
    images = ImageSet(test.x[keep], test.y[keep])
    rows = [
        "| pool | expert | task accuracy (%) | mean max logit, own images | mean max logit, other tasks' images |",
        "| --- | --- | --- | --- | --- |",
    ]
    for db, pool in zip(dbs, pools, strict=True):
        whole = pool.query(tasks)
        full = consolidated_logits(whole.module, images, Normalizer(cfg.mean, cfg.std, "cpu"), CPU)
        at = {c: i for i, c in enumerate(whole.classes)}
        logits = {t: full[:, [at[c] for c in cfg.tasks[t]]] for t in tasks}  # each expert's own columns
        for t in tasks:
            own_classes = torch.tensor(cfg.tasks[t])
            own = torch.isin(images.y, own_classes)
            top, arg = logits[t].max(1)
            acc = 100 * (own_classes[arg[own]] == images.y[own]).float().mean()
            rows.append(f"| {db} | {t} | {acc:.2f} | {top[own].mean():.2f} | {top[~own].mean():.2f} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", nargs="+", default=["DB_PoE"], help="pool roots; each pool is <db>/cifar100/")
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="the experts to compare (default: the six default tasks)",
    )
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    return run_main(body, p, None)


def body(a: argparse.Namespace) -> int:
    text = table(a.db, a.data_root, a.tasks)
    print(text, end="")
    if a.out:
        write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
