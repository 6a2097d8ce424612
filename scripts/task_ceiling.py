"""Where one task's expert stands against what it is distilled from: on the task's test images, the Oracle's accuracy
with its argmax restricted to the task's classes (what conditional KD copies: an expert that matched the Oracle
exactly would score this), the library students' restricted accuracy (the whole WRN-16-1 each library was cut
from), and each pool's expert alone: accuracy, agreement with the Oracle, logit scale.

    python scripts/task_ceiling.py --data_root ../shared/data --task people \
        --db DB_PoE ../shared/official/cifar100 --pretrained DB_pretrained
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.cli.common import run_main
from PoE.core.checkpoint import load_checkpoint, load_into
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import get_dataset, load_split
from PoE.core.errors import PoEError
from PoE.core.evaluate import batched_logits
from PoE.core.networks import WideResNet, WRNSpec, build_network
from PoE.core.paths import DATA_ROOT_HELP, default_data_root
from PoE.core.runtime import CPU
from PoE.query.pool import Pool


def logits_of(model: nn.Module, images: ImageSet, norm: Normalizer) -> torch.Tensor:
    """fp32 logits of ``model`` (eval mode, CPU) on ``images``."""
    return torch.cat(list(batched_logits(model.eval(), images.x, norm, CPU)))


def row(name: str, logits: torch.Tensor, cols: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor | None) -> str:
    """One table row: accuracy over the task's classes, agreement with the Oracle's restricted argmax, logit scale."""
    own = logits if logits.shape[1] == len(cols) else logits[:, cols]
    pred = own.argmax(1)
    acc = 100 * (cols[pred] == labels).float().mean()
    agree = "" if ref is None else f"{100 * (pred == ref).float().mean():.1f}"
    top = own.max(1).values
    return f"| {name} | {acc:.1f} | {agree} | {top.mean():.2f} | {own.std(1).mean():.2f} |"


def oracle_of(pretrained: Path, cfg) -> nn.Module:
    ck = load_checkpoint(pretrained / cfg.name / "oracle.pt")
    return load_into(build_network(ck["arch"], cfg), ck["state_dict"], pretrained, "Oracle").float()


def student_of(pretrained: Path | None, official: Path | None, cfg) -> nn.Module:
    """The whole library student: ours (``library_student.pt``), or the original release's library + head."""
    net = WideResNet(WRNSpec(16, 1), cfg.num_classes)
    if official is not None:
        net.front.load_state_dict(load_checkpoint(official / "library_cifar100.pt"))
        net.back.load_state_dict(load_checkpoint(official / "library_student_classifier_cifar100.pt"))
        return net
    ck = load_checkpoint(pretrained / cfg.name / "library_student.pt")
    return load_into(net, ck["state_dict"], pretrained, "library student").float()


def table(task: str, data_root: str, dbs: list[str], pretrained: Path, official: Path | None, split: str) -> str:
    cfg = get_dataset("cifar100")
    if task not in cfg.tasks:
        raise PoEError(f"unknown task {task!r}; known: {', '.join(cfg.tasks)}")
    cols = torch.tensor(cfg.tasks[task])
    data = load_split("cifar100", data_root, split, progress=False)
    keep = torch.isin(data.y, cols)
    images, norm = ImageSet(data.x[keep], data.y[keep]), Normalizer(cfg.mean, cfg.std, "cpu")
    oracle = logits_of(oracle_of(pretrained, cfg), images, norm)
    ref = oracle[:, cols].argmax(1)
    all_acc = 100 * (oracle.argmax(1) == images.y).float().mean()
    rows = [
        f"{task}: {len(images)} {split} images of classes {cols.tolist()}; Oracle over all 100 classes: {all_acc:.1f}%",
        "",
        "| model | accuracy over the task's classes (%) | agrees with the Oracle (%) | mean max logit | "
        "mean logit std |",
        "| --- | --- | --- | --- | --- |",
        row(f"Oracle ({pretrained}), argmax over the task's classes", oracle, cols, images.y, None),
        row(
            "library student (ours), restricted",
            logits_of(student_of(pretrained, None, cfg), images, norm),
            cols,
            images.y,
            ref,
        ),
    ]
    if official is not None:
        rows.append(
            row(
                "library student (original release), restricted",
                logits_of(student_of(None, official, cfg), images, norm),
                cols,
                images.y,
                ref,
            )
        )
    for db in dbs:
        pool = Pool.open(db)
        net = nn.Sequential(pool.library, pool.experts[task])
        rows.append(row(f"expert of {db}", logits_of(net, images, norm), cols, images.y, ref))
    return "\n".join(rows) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="people", help="a CIFAR-100 superclass (default: people)")
    p.add_argument("--db", nargs="+", default=["DB_PoE"], help="pools whose expert of the task is scored")
    p.add_argument(
        "--pretrained",
        type=Path,
        default=Path("DB_pretrained"),
        help="holds cifar100/oracle.pt and cifar100/library_student.pt (default: DB_pretrained)",
    )
    p.add_argument(
        "--official",
        type=Path,
        default=None,
        help="the original release's cifar100 folder: adds its library student (library + released head)",
    )
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument("--split", choices=("test", "train"), default="test", help="images scored (default: test)")
    return run_main(body, p, None)


def body(a: argparse.Namespace) -> int:
    print(table(a.task, a.data_root, a.db, a.pretrained, a.official, a.split), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
