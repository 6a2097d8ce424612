"""What Run_preprocessing.py does with its parsed flags: build (or add to) a pool, or remove tasks from one."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from PoE.cli.preprocessing.parser import PAPER_ON_CPU
from PoE.cli.preprocessing.settings import preprocessing_settings
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PoE.build.preprocess import Settings


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
    plan, places, execution = s.plan, s.places, s.execution
    pool = places.db / plan.cfg.name
    if plan.adding and not plan.tasks:
        from PoE.core.tasks import write_copy

        write_copy(pool_folder(a), plan.hierarchy, plan.cfg)  # an add killed after its commit: this finishes it
        print(f"nothing to add: every task of {a.add_tasks} is in the pool {pool} already")
        return 0
    execution.runtime = replace(execution.runtime, device=distributed.setup(execution.device))  # one GPU per process
    main = distributed.is_main()
    execution.banner = banner(s, distributed.world())
    if main and plan.profile.name == "paper" and execution.device.type == "cpu":  # stdout: an error stays one line
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
            f"nothing trained: every part asked for is already in {pool} and {places.pretrained / plan.cfg.name}"
            f", and nothing was written; to build another pool give a new --db and --pretrained, or --retrain "
            "STAGE to train a stage again"
        )
        return 0
    print()
    print(report.table())
    print(
        f"\nwall time of this run: {report.wall_seconds:.0f}s; teacher logits computed: "
        f"{report.teacher_cache_seconds:.0f}s; pool: {pool}"
    )
    return 0


def banner(s: Settings, procs: int) -> str:
    """The line a run prints before it makes its first part."""
    plan, training, execution = s.plan, s.training, s.execution
    return (
        f"Pool of Experts preprocessing: {plan.cfg.name}, profile {plan.profile.name}, Oracle {training.oracle_arch}, "
        f"device {execution.device}{f' x {procs} processes' if procs > 1 else ''}, "
        f"stages {', '.join(plan.stages)}; {execution.runtime.describe()}"
        f"{'; torch.compile: ' + ', '.join(training.compile) if training.compile else ''}"
    )
