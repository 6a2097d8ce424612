"""Run_preprocessing.py: build the pool (Oracle, library, experts), resumable stage by stage."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
    run_main,
    runtime_of,
    tasks_epilog,
)
from PoE.core.datasets.folder import MAX_IMAGE_SIZE
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PoE.build.profiles import Profile, StageConfig
    from PoE.core.datasets import DatasetConfig
    from PoE.core.tasks import Hierarchy

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


def preprocessing_settings(a: argparse.Namespace):
    """The run's Settings from the parsed flags: every check that needs no data or training runs here."""
    from PoE.build.preprocess import Settings
    from PoE.build.profiles import for_dataset, get_profile

    cfg, hierarchy, tasks = dataset_and_tasks(a)
    prof = for_dataset(get_profile(a.profile), cfg)
    stages = stage_configs(a, prof)
    oracle_arch = oracle_choice(a, prof, cfg)
    views = prof.teacher_views if a.teacher_views is None else a.teacher_views
    if cfg.networks.pretrained and views:
        raise PoEError(f"--teacher_views must be 0 for {cfg.name}: its images are streamed, the Oracle sees each batch")
    runtime = runtime_of(a)
    named = {"on": STAGES, "off": (), "auto": prof.compile if runtime.device.type == "cuda" else ()}
    compile_stages = [st for st in STAGES if any(st in named.get(c, (c,)) for c in a.compile)]
    return Settings(
        cfg=cfg,
        profile=prof,
        oracle_arch=oracle_arch,
        oracle=stages["oracle"],
        library=stages["library"],
        experts=stages["experts"],
        T=prof.T if a.T is None else a.T,
        alpha=prof.alpha if a.alpha is None else a.alpha,
        teacher_views=views,
        seed=a.seed,
        runtime=runtime,
        data_root=Path(a.data_root),
        db=Path(a.db),
        pretrained=Path(a.pretrained),
        tasks=tasks,
        stages=("experts",) if a.add_tasks else tuple(s for s in STAGES if s in a.stages),
        adding=bool(a.add_tasks),
        retrain=tuple(a.retrain),
        train_limit=a.train_limit or prof.train_limit,
        test_limit=a.test_limit or prof.test_limit,
        soft=a.loss in ("both", "soft"),
        scale=a.loss in ("both", "scale"),
        progress=not a.no_progress,
        command="python Run_preprocessing.py " + " ".join(a.argv),
        oracle_weights=Path(a.oracle_weights) if a.oracle_weights else None,
        library_weights=Path(a.library_weights) if a.library_weights else None,
        workers=a.workers,
        compile=tuple(compile_stages),
        hierarchy=hierarchy,
        library_from=Path(a.library_from) if a.library_from else None,
        oracle_file=Path(a.oracle) if a.oracle else None,
        oracle_classes=Path(a.oracle_classes) if a.oracle_classes else None,
        trust_oracle_code=a.trust_oracle_code,
    )


def dataset_and_tasks(a: argparse.Namespace) -> tuple[DatasetConfig, Hierarchy, list[str]]:
    """The dataset (described by its data for a folder), its hierarchy and the tasks to build."""
    from PoE.core.datasets import described_by_data, get_dataset
    from PoE.core.networks import family_of
    from PoE.core.query import make_query
    from PoE.core.tasks import Hierarchy, hierarchy_to_build

    cfg = get_dataset(a.dataset)
    folders = [Path(a.db) / cfg.name, Path(a.pretrained) / cfg.name]  # a folder dataset's pool and Oracle
    cfg = described_by_data(cfg, Path(a.data_root), a.image_size, a.skip_bad_images, folders)
    smallest = family_of(cfg).min_input
    if cfg.image_size < smallest:
        raise PoEError(
            f"{cfg.name} at {cfg.image_size} pixels is below the {cfg.family} networks' smallest image side "
            f"({smallest}): give --image_size {smallest} or more (images are resized to it)"
        )
    if a.add_tasks:
        hierarchy, tasks = addition(a, cfg)
        cfg = hierarchy.apply(cfg)
    else:
        hierarchy = hierarchy_to_build(cfg, Path(a.db) / cfg.name, Hierarchy.given(a.hierarchy, cfg))
        cfg = hierarchy.apply(cfg)
        tasks = list(cfg.tasks) if a.tasks is None else a.tasks
        make_query(tasks, cfg.tasks, cfg.name)  # validates names, duplicates, emptiness
    if a.library_weights and not cfg.networks.pretrained:  # a folder of large images: a width-1 student, from them
        if cfg.family != "mobilenetv2":
            raise PoEError(
                f"--library_weights starts a MobileNetV2 library student (a folder of images over 64 "
                f"pixels) from a whole torchvision mobilenet_v2's weights; {cfg.name} at {cfg.image_size} "
                f"pixels distills a {cfg.networks.library_arch}: leave --library_weights out"
            )
        cfg = dataclasses.replace(cfg, networks=dataclasses.replace(cfg.networks, library_arch="mobilenet_v2"))
    return cfg, hierarchy, tasks


def stage_configs(a: argparse.Namespace, prof: Profile) -> dict[str, StageConfig]:
    """Each stage's schedule: the profile's, with the flags that override it."""
    from PoE.build.preprocess import STAGES
    from PoE.build.profiles import override

    stages = {}
    for stage in STAGES:
        name = stage.rstrip("s")
        stages[stage] = override(
            getattr(prof, stage),
            epochs=getattr(a, f"{name}_epochs") or a.epochs,
            lr=getattr(a, f"{name}_lr"),
            batch_size=getattr(a, f"{name}_batch_size") or a.batch_size,
            schedule=getattr(a, f"{name}_schedule"),
            weight_decay=a.weight_decay,
        )
    stages["oracle"] = override(stages["oracle"], label_smoothing=a.label_smoothing)
    return stages


def oracle_choice(a: argparse.Namespace, prof: Profile, cfg: DatasetConfig) -> str:
    """The Oracle's architecture (or the user's file), with the flags that contradict it refused."""
    from PoE.core.networks import check_arch

    if a.trust_oracle_code and not a.oracle:
        raise PoEError("--trust_oracle_code lets an --oracle FILE run as a program; name the file too")
    if a.oracle_classes and not a.oracle:
        raise PoEError("--oracle_classes gives the class order of an --oracle FILE; name the file too")
    if a.oracle and a.oracle_arch:
        raise PoEError("--oracle FILE is the Oracle; --oracle_arch names one to train: give one of them")
    oracle_arch = a.oracle_arch or prof.oracle_arch or cfg.networks.oracle_arch
    try:
        check_arch(oracle_arch, cfg)
    except ValueError as e:
        raise PoEError(f"--oracle_arch: {e}") from None
    if a.oracle_weights and not cfg.networks.pretrained and (a.oracle or oracle_arch.lower() != "mobilenet_v2"):
        what = f"your --oracle {a.oracle}" if a.oracle else oracle_arch
        raise PoEError(
            f"--oracle_weights starts an Oracle trained here from a whole torchvision mobilenet_v2's "
            f"weights; this run's Oracle is {what}: give --oracle_arch mobilenet_v2 (the default over "
            "64 pixels), or leave --oracle_weights out"
        )
    if a.oracle:
        oracle_arch = f"{Path(a.oracle).name} (yours)"
    return oracle_arch


def addition(a: argparse.Namespace, cfg: DatasetConfig) -> tuple[Hierarchy, list[str]]:
    """``--add_tasks``: the pool's hierarchy with the file's new tasks, and the new tasks (checked against the
    pool, which is opened and checked first)."""
    from PoE.build.edit import plan_addition
    from PoE.build.preprocess import STAGES
    from PoE.core.tasks import Hierarchy
    from PoE.query.pool import Pool

    given = [
        f
        for f, v in (
            ("--hierarchy", a.hierarchy),
            ("--tasks", a.tasks),
            ("--library_from", a.library_from),
            ("--retrain", a.retrain),
        )
        if v
    ]
    if a.stages not in (list(STAGES), ["experts"]):
        given.append("--stages")
    if given:
        raise PoEError(
            f"--add_tasks trains the new tasks' experts into the pool as it is; {given[0]} does not go with it"
        )
    plan = plan_addition(Pool.open(a.db, cfg.name, expected_digest=a.pool_digest), Hierarchy.read(a.add_tasks, cfg))
    return plan.hierarchy, plan.new


def remove_body(a: argparse.Namespace) -> int:
    """``--remove_tasks``: the manifest without the tasks, then their files (nothing trained, no data read)."""
    from PoE.build.edit import editing, remove_tasks
    from PoE.query.pool import Pool

    if a.add_tasks:
        raise PoEError("--remove_tasks and --add_tasks: give one per command (remove first, then add)")
    if a.tasks is not None or a.retrain:
        raise PoEError("--remove_tasks names the tasks to remove; --tasks and --retrain do not go with it")
    with editing(pool_folder(a)):
        pool = Pool.open(a.db, a.dataset, hierarchy=a.hierarchy, expected_digest=a.pool_digest)
        lines = remove_tasks(pool, a.remove_tasks, "python Run_preprocessing.py " + " ".join(a.argv))
    print("\n".join(lines))
    return 0


def pool_folder(a: argparse.Namespace) -> Path:
    """The folder of the built pool at --db (a missing one is refused in one line)."""
    from PoE.core.datasets import get_dataset
    from PoE.core.pool_paths import resolve_pool

    cfg = get_dataset(a.dataset)
    return resolve_pool(a.db, cfg.name, cfg.tag).root


def preprocessing_body(a: argparse.Namespace) -> int:
    if a.remove_tasks is not None:
        return remove_body(a)
    if a.pool_digest and not a.add_tasks:
        raise PoEError(
            "--pool_digest pins the pool a command reads; with Run_preprocessing.py it goes with "
            "--add_tasks or --remove_tasks (the pool they change must be that one)"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun rank 0 holds the lock for all
        from PoE.build.edit import editing
        from PoE.core.datasets import get_dataset

        folder = pool_folder(a) if a.add_tasks else Path(a.db) / get_dataset(a.dataset).name
        with editing(folder, create=not a.add_tasks):  # one writer of a pool at a time
            return build_body(a)
    return build_body(a)


def build_body(a: argparse.Namespace) -> int:
    from dataclasses import replace

    from PoE.build import distributed, stages

    s = preprocessing_settings(a)
    if s.adding and not s.tasks:
        from PoE.core.tasks import write_copy

        write_copy(pool_folder(a), s.hierarchy, s.cfg)  # an add killed after its commit: this finishes it
        print(f"nothing to add: every task of {a.add_tasks} is in the pool {s.db / s.cfg.name} already")
        return 0
    s.runtime = replace(s.runtime, device=distributed.setup(s.device))  # under torchrun: one GPU per process
    main, procs = distributed.is_main(), distributed.world()
    s.banner = (
        f"Pool of Experts preprocessing: {s.cfg.name}, profile {s.profile.name}, Oracle {s.oracle_arch}, "
        f"device {s.device}{f' x {procs} processes' if procs > 1 else ''}, "
        f"stages {', '.join(s.stages)}; {s.runtime.describe()}"
        f"{'; torch.compile: ' + ', '.join(s.compile) if s.compile else ''}"
    )
    if main and s.profile.name == "paper" and s.device.type == "cpu":  # on stdout: an error stays one line on stderr
        print(f"warning: {PAPER_ON_CPU}")
    try:
        report = stages.run(s)
        distributed.finish()
    finally:
        distributed.destroy()
    if not main:  # rank 0 reports
        return 0
    if not report.made and not report.evaluated:  # every part loaded as it was: nothing new to show
        print(
            f"nothing trained: every part asked for is already in {s.db / s.cfg.name} and {s.pretrained / s.cfg.name}"
            f", and nothing was written; to build another pool give a new --db and --pretrained, or --retrain "
            "STAGE to train a stage again"
        )
        return 0
    print()
    print(report.table())
    print(
        f"\nwall time of this run: {report.wall_seconds:.0f}s; teacher logits computed: "
        f"{report.teacher_cache_seconds:.0f}s; pool: {s.db / s.cfg.name}"
    )
    return 0


def main_preprocessing(argv: Sequence[str] | None = None) -> int:
    return run_main(preprocessing_body, preprocessing_parser(), argv)
