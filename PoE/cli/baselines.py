"""Run_Baselines.py: the paper's training-based baselines for one query, beside PoE; and the baselines'
training flags that Run_Experiments.py shares."""

from __future__ import annotations

import argparse
import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PoE.build.baselines import METHODS
from PoE.build.profiles import KD_ALPHA, KD_T, PAPER_LR
from PoE.cli.common import (
    ALPHA,
    BUDGET,
    LEARNING_RATE,
    NONNEG_INT,
    POSITIVE_INT,
    SEED,
    TEMPERATURE,
    Help,
    Parser,
    common_arguments,
    open_pool,
    read_pool_folder,
    run_main,
    runtime_of,
    tasks_epilog,
)
from PoE.core.datasets import DatasetConfig
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PoE.build.baselines import BaselineRunner
    from PoE.core.data import ImageSet
    from PoE.core.runtime import Runtime
    from PoE.query.pool import Pool


def baselines_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Baselines.py",
        description="Train the paper's baselines for a query and print them beside PoE's train-free model: "
        "accuracy on the composite task, multiply-adds, parameters and the wall time to produce each model.",
        epilog=tasks_epilog(),
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--queriedTask", nargs="+", required=True, metavar="TASK", help="primitive tasks of the query")
    p.add_argument(
        "--method", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD", help=f"of {', '.join(METHODS)}"
    )
    p.add_argument("--T", type=TEMPERATURE, default=KD_T, help="distillation temperature")
    p.add_argument("--alpha", type=ALPHA, default=KD_ALPHA, help="weight of the L1 term of CKD")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON list (last line)")
    baseline_arguments(p)
    return p


def baseline_arguments(p: argparse.ArgumentParser) -> None:
    """How the baselines train: the flags Run_Baselines.py and Run_Experiments.py share (see BaselineConfig)."""
    g = p.add_argument_group("baselines' training")
    g.add_argument(
        "--pretrained",
        default="DB_pretrained",
        help="folder of the Oracle (ckd's teacher, the Oracle's "
        "row); the per-task Scratch teachers of sd_scratch and uhc_scratch are cached under it",
    )
    g.add_argument(
        "--epochs",
        type=POSITIVE_INT,
        default=None,
        help="epochs of every method (default: the paper's: 200 for scratch, sd, uhc; 100 for transfer, ckd)",
    )
    g.add_argument(
        "--budget",
        type=BUDGET,
        default=1.0,
        help="without --epochs: this fraction of the paper's "
        "schedule for each method (200 epochs for scratch, sd, uhc; 100 for transfer, ckd)",
    )
    g.add_argument("--lr", type=LEARNING_RATE, default=PAPER_LR, help="peak learning rate")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=512, help="batch size")
    g.add_argument(
        "--schedule", default="step", choices=("step", "onecycle"), help="step (x0.1 at 40%% and 80%%) or onecycle"
    )
    g.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help="seeds weights and batch order (and Run_Experiments' sample of combinations)",
    )
    g.add_argument(
        "--ckd_views",
        type=NONNEG_INT,
        default=0,
        help="ckd: cache the Oracle's logits for this many "
        "augmented views of the query's images (0: the Oracle on every batch, as the paper)",
    )
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


def runners(
    a: argparse.Namespace,
    cfg: DatasetConfig,
    runtime: Runtime,
    train: Callable[[], ImageSet],
    test: ImageSet,
    pool: Callable[[], Pool],
    T: float = KD_T,
    alpha: float = KD_ALPHA,
) -> Callable[[str], BaselineRunner]:
    """Method -> its BaselineRunner on the command line's schedule (``train()`` gives the training images, ``pool()``
    the pool, opened when a method first needs it)."""
    from PoE.build.baselines import BaselineConfig, baseline_runner

    how = BaselineConfig(
        pretrained=Path(a.pretrained),
        epochs=a.epochs,
        budget=a.budget,
        lr=a.lr,
        batch_size=a.batch_size,
        schedule=a.schedule,
        T=T,
        alpha=alpha,
        seed=a.seed,
        runtime=runtime,
        ckd_views=a.ckd_views,
        progress=not a.no_progress,
    )
    return lambda method: baseline_runner(method, cfg, train(), test, pool, how)


def baselines_body(a: argparse.Namespace) -> int:
    from PoE.build.baselines import poe_row, result_row
    from PoE.core.datasets import load_split
    from PoE.core.query import make_query
    from PoE.experiments import markdown_table

    folder = read_pool_folder(a, missing_ok=True)  # read once; a method that needs no pool runs without one
    cfg = folder.cfg
    query = make_query(a.queriedTask, cfg.tasks, cfg.name)
    runtime = runtime_of(a)
    train = load_split(cfg, a.data_root, "train")
    test = load_split(cfg, a.data_root, "test")
    pool = functools.cache(lambda: open_pool(folder, runtime.fp32))  # opened once, when first needed
    runner = runners(a, cfg, runtime, lambda: train, test, pool, a.T, a.alpha)
    rows = [result_row(runner(method).run(method, list(query.tasks))) for method in a.method]
    try:
        rows.append(poe_row(pool(), query, test))
    except PoEError as e:
        print(f"(no PoE row: {e})")
    cols = [
        ("method", "method"),
        ("accuracy", "accuracy (%)"),
        ("n_test", "test images"),
        ("macs", "multiply-adds"),
        ("params", "parameters"),
        ("epochs", "epochs"),
        ("seconds", "time to produce (s)"),
        ("teacher_seconds", "+ teachers (s)"),
    ]
    print(f"query: {', '.join(query.tasks)} ({query.num_classes} classes); device {runtime.device}")
    print(markdown_table(rows, cols))
    if a.json:
        print(json.dumps(rows))
    return 0


def main_baselines(argv: Sequence[str] | None = None) -> int:
    return run_main(baselines_body, baselines_parser(), argv)
