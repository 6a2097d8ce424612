"""Run_preprocessing.py's flags: the parser and its help (no torch imported)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from PoE.build.profiles import PROFILES, STAGES
from PoE.cli.common import (
    ALPHA,
    FRACTION,
    LEARNING_RATE,
    NONNEG_INT,
    POSITIVE_INT,
    SEED,
    TEMPERATURE,
    Help,
    Parser,
    common_arguments,
    number,
    tasks_epilog,
)
from PoE.core.datasets.folder import MAX_IMAGE_SIZE

IMAGE_SIZE = number(int, 1, high=MAX_IMAGE_SIZE, high_ok=True)  # below a family's smallest side: refused later


def per_profile(what: Callable[[object], object]) -> str:
    """``what`` of each profile, for a help text: 'paper: 200, quick: 1, ...' (or one value if they agree)."""
    values = {k: what(v) for k, v in PROFILES.items()}
    if len(set(values.values())) == 1:
        return f"the profile's: {next(iter(values.values()))} in every profile"
    return "the profile's: " + ", ".join(f"{k} {v}" for k, v in values.items())


def stage_values(field: str) -> Callable[[object], str]:
    """A profile's ``field`` of each stage, 'Oracle / library / experts', or once if they agree."""

    def values(prof: object) -> str:
        v = [str(getattr(getattr(prof, st), field)) for st in STAGES]
        return v[0] if len(set(v)) == 1 else " / ".join(v)

    return values


# measured: the paper's WRN-40-4 Oracle trains at 93 images/s in bf16 on 2 AVX512-BF16 cores (docs/speed.md)
PAPER_ON_CPU = (
    "the paper profile (the default) would run for days on a CPU (CIFAR-100's WRN-40-4 Oracle alone: 200 epochs "
    "of about 9 minutes each on 2 cores with bf16); on a CPU use --profile cpu (100 minutes measured on 2 cores)"
)


def preprocessing_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_preprocessing.py",
        description="Build the pool: train (or load) the Oracle, distill the library, extract one expert per "
        "primitive task by conditional KD. Finished stages are loaded; interrupted ones resume.",
        epilog=tasks_epilog(),
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument(
        "--profile",
        default="paper",
        choices=list(PROFILES),
        help="schedule preset: "
        + "; ".join(f"{k}: {v.description}" for k, v in PROFILES.items())
        + f". Note: {PAPER_ON_CPU}",
    )
    pool_flags(p)
    oracle_file_flags(p)
    schedule_flags(p)
    pretrained_flags(p)
    return p


def pool_flags(p: argparse.ArgumentParser) -> None:
    """Which pool: its stages, tasks, folders, seed, and the in-place edits."""
    p.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        choices=STAGES,
        metavar="STAGE",
        help=f"stages to run, of {', '.join(STAGES)}",
    )
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="primitive tasks (default: all; the built-in datasets' tasks are listed below)",
    )
    p.add_argument(
        "--retrain", nargs="*", default=[], choices=STAGES, metavar="STAGE", help="retrain these stages even if done"
    )
    p.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle and library student")
    p.add_argument("--seed", type=SEED, default=0, help="seeds weights, batch order and augmented views")
    p.add_argument(
        "--image_size",
        type=IMAGE_SIZE,
        default=None,
        help="--dataset folder: the images' size in "
        "pixels (default: the first training image's longer side, at most 224; up to 64 the WRN family, "
        "beyond MobileNetV2: 96 or 128 train fast on a CPU)",
    )
    p.add_argument(
        "--library_from",
        default=None,
        metavar="DB",
        help="start the pool from the library of this pool "
        "(its id checked against --pretrained's library student): a new --hierarchy then trains only its "
        "experts, on the Oracle's cached logits",
    )
    p.add_argument("--oracle_arch", default=None, help="Oracle network, e.g. wrn-40-4 (default: the profile's)")
    p.add_argument(
        "--add_tasks",
        default=None,
        metavar="FILE",
        help="add the tasks of this hierarchy file to the "
        "built pool at --db, in place: only their experts are trained (on the pool's library and the "
        "Oracle's cached logits), then the manifest is written; no other file changes. The file may "
        "repeat the pool's tasks, unchanged",
    )
    p.add_argument(
        "--remove_tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="remove these tasks and their "
        "experts from the pool at --db (the manifest first, then the files); no training",
    )


def oracle_file_flags(p: argparse.ArgumentParser) -> None:
    """Your own Oracle file instead of a trained one."""
    p.add_argument(
        "--oracle",
        default=None,
        metavar="FILE",
        help="your own Oracle instead of training one: an ONNX model (.onnx) mapping float RGB in [0, 1], "
        "N x 3 x S x S, to logits over the dataset's classes (checked on a batch, scored on the test split); "
        "a torch.export program (.pt2) or TorchScript file only with --trust_oracle_code",
    )
    p.add_argument(
        "--trust_oracle_code",
        action="store_true",
        help="load a .pt2 or TorchScript --oracle: such a file is a program, and loading or running it can do "
        "anything you can (read and write your files); give it only for a file you made or trust",
    )
    p.add_argument(
        "--oracle_classes",
        default=None,
        metavar="FILE",
        help="the --oracle's class order when it differs from the dataset's: one class name per line, or a JSON list",
    )


def schedule_flags(p: argparse.ArgumentParser) -> None:
    """The training schedule, per stage or for all (default: the profile's)."""
    for stage in STAGES:
        g = p.add_argument_group(f"{stage} stage (default: the profile's)")
        name = stage.rstrip("s")
        g.add_argument(f"--{name}_epochs", type=POSITIVE_INT, default=None, help="epochs")
        g.add_argument(f"--{name}_lr", type=LEARNING_RATE, default=None, help="peak learning rate")
        g.add_argument(f"--{name}_batch_size", type=POSITIVE_INT, default=None, help="batch size")
        g.add_argument(f"--{name}_schedule", default=None, choices=("step", "onecycle"), help="learning-rate schedule")
    p.add_argument(
        "--epochs",
        type=POSITIVE_INT,
        default=None,
        help=f"epochs of every stage (default: {per_profile(stage_values('epochs'))}, for Oracle / library / experts)",
    )
    p.add_argument(
        "--batch_size",
        type=POSITIVE_INT,
        default=None,
        help=f"batch size of every stage (default: {per_profile(stage_values('batch_size'))})",
    )
    p.add_argument(
        "--weight_decay",
        type=FRACTION,
        default=None,
        help=f"weight decay of every stage (default: {per_profile(stage_values('weight_decay'))})",
    )
    p.add_argument(
        "--label_smoothing",
        type=FRACTION,
        default=None,
        help="Oracle cross-entropy label smoothing, "
        f"in [0, 1) (default: {per_profile(lambda prof: prof.oracle.label_smoothing)})",
    )
    p.add_argument(
        "--T",
        type=TEMPERATURE,
        default=None,
        help=f"distillation temperature (default: {per_profile(lambda prof: prof.T)})",
    )
    p.add_argument(
        "--alpha", type=ALPHA, default=None, help=f"weight of L_scale (default: {per_profile(lambda prof: prof.alpha)})"
    )
    p.add_argument(
        "--loss",
        default="both",
        choices=("both", "soft", "scale"),
        help="expert loss: both (L_soft + alpha L_scale), soft or scale",
    )
    p.add_argument(
        "--teacher_views",
        type=NONNEG_INT,
        default=None,
        help="augmented views whose Oracle logits are "
        "cached and cycled through (0: run the Oracle on every batch; default: "
        f"{per_profile(lambda prof: prof.teacher_views)})",
    )
    p.add_argument(
        "--train_limit",
        type=POSITIVE_INT,
        default=None,
        help="train on a random subset of this many images (default: the profile's; all but in the smoke profile)",
    )
    p.add_argument(
        "--test_limit",
        type=POSITIVE_INT,
        default=None,
        help="score every part on a random subset of this many test images (default: the profile's; all but in the "
        "smoke profile; each stored accuracy records its image count)",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--compile",
        nargs="+",
        default=["auto"],
        choices=("auto", "on", "off", *STAGES),
        metavar="WHICH",
        help="torch.compile the training steps of these stages (on: all, off: none; auto: the profile's, on CUDA only)",
    )


def pretrained_flags(p: argparse.ArgumentParser) -> None:
    """Pretrained networks for ImageNet and large images."""
    g = p.add_argument_group("pretrained Oracle and library (ImageNet)")
    g.add_argument(
        "--oracle_weights",
        default=None,
        help="the Oracle's state dict file (default: torchvision's "
        "ImageNet weights in the torch hub cache); for a folder of large images, a whole torchvision "
        "mobilenet_v2 state dict the Oracle trained here starts from",
    )
    g.add_argument(
        "--library_weights",
        default=None,
        help="a whole MobileNetV2 state dict file whose features[:18] "
        "become the library (default: torchvision's ImageNet weights in the torch hub cache); for a folder "
        "of large images, the start of a width-1 library student, then distilled",
    )
    g.add_argument(
        "--workers",
        type=NONNEG_INT,
        default=None,
        help="DataLoader workers decoding images (default: one per core, at most 8)",
    )
