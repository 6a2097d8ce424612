"""The run's ``Settings`` from Run_preprocessing's parsed flags: every check that needs no data or training."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from PoE.build.profiles import STAGES
from PoE.cli.common import runtime_of
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PoE.build.preprocess import Places, Settings, Training
    from PoE.build.profiles import Profile, StageConfig
    from PoE.core.datasets import DatasetConfig
    from PoE.core.tasks import Hierarchy


def preprocessing_settings(a: argparse.Namespace) -> Settings:
    """The run's Settings from the parsed flags: every check that needs no data or training runs here."""
    from PoE.build.preprocess import Execution, Plan, Settings
    from PoE.build.profiles import for_dataset, get_profile

    cfg, hierarchy, tasks = dataset_and_tasks(a)
    prof = for_dataset(get_profile(a.profile), cfg)
    stages = ("experts",) if a.add_tasks else tuple(s for s in STAGES if s in a.stages)
    plan = Plan(cfg, prof, tasks, hierarchy, stages, tuple(a.retrain), adding=bool(a.add_tasks))
    training = training_of(a, prof, cfg)
    runtime = runtime_of(a)
    named = {"on": STAGES, "off": (), "auto": prof.compile if runtime.device.type == "cuda" else ()}
    compile_stages = tuple(st for st in STAGES if any(st in named.get(c, (c,)) for c in a.compile))
    training = dataclasses.replace(training, compile=compile_stages)
    command = "python Run_preprocessing.py " + " ".join(a.argv)
    return Settings(plan, places_of(a), training, Execution(runtime, not a.no_progress, a.workers, command))


def places_of(a: argparse.Namespace) -> Places:
    """The run's folders and the files its parts are, or start from."""
    from PoE.build.preprocess import Places

    def path(value: str | None) -> Path | None:
        return Path(value) if value else None

    return Places(
        data_root=Path(a.data_root),
        db=Path(a.db),
        pretrained=Path(a.pretrained),
        library_from=path(a.library_from),
        oracle_file=path(a.oracle),
        oracle_classes=path(a.oracle_classes),
        trust_oracle_code=a.trust_oracle_code,
        oracle_weights=path(a.oracle_weights),
        library_weights=path(a.library_weights),
    )


def training_of(a: argparse.Namespace, prof: Profile, cfg: DatasetConfig) -> Training:
    """How the parts train: the profile's, with the flags that override it (torch.compile is the caller's)."""
    from PoE.build.preprocess import Training

    stages = stage_configs(a, prof)
    oracle_arch = oracle_choice(a, prof, cfg)
    views = prof.teacher_views if a.teacher_views is None else a.teacher_views
    if cfg.networks.pretrained and views:
        raise PoEError(f"--teacher_views must be 0 for {cfg.name}: its images are streamed, the Oracle sees each batch")
    return Training(
        oracle_arch=oracle_arch,
        oracle=stages["oracle"],
        library=stages["library"],
        experts=stages["experts"],
        T=prof.T if a.T is None else a.T,
        alpha=prof.alpha if a.alpha is None else a.alpha,
        teacher_views=views,
        seed=a.seed,
        train_limit=a.train_limit or prof.train_limit,
        test_limit=a.test_limit or prof.test_limit,
        soft=a.loss in ("both", "soft"),
        scale=a.loss in ("both", "scale"),
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
