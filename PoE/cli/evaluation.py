"""Run_Evaluation.py: a pool's train-free models over every combination of n tasks."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from PoE.cli.common import (
    POSITIVE_INT,
    Help,
    Parser,
    check_combinations,
    chosen_tasks,
    combinations_argument,
    common_arguments,
    open_pool,
    read_pool_folder,
    run_main,
    runtime_of,
    tasks_epilog,
)
from PoE.core.errors import PoEError


def evaluation_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Evaluation.py",
        description="Score a pool's train-free consolidated models over every combination of n of a list of "
        "tasks and print, per n, the mean +- std accuracy (over combinations), the share of errors that are "
        "cross-expert errors, and the models' multiply-adds and parameters.",
        epilog=tasks_epilog(default_tasks=True),
        formatter_class=Help,
    )
    common_arguments(p, precision="fp32")
    p.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="tasks to combine (default: the dataset's six default tasks; with a hierarchy file, its first six)",
    )
    p.add_argument(
        "--n", nargs="+", type=POSITIVE_INT, default=None, help="combination sizes (default: 2 .. len(tasks)-1)"
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FOLDER",
        help="also write FOLDER/combinations.md and .csv (per n) and FOLDER/combinations_all.csv (per combination)",
    )
    p.add_argument("--json", action="store_true", help="also print the per-n rows as one JSON list (last line)")
    combinations_argument(p)
    return p


def evaluation_body(a: argparse.Namespace) -> int:
    from PoE.core.datasets import load_split
    from PoE.core.query import make_query
    from PoE.experiments import (
        SUMMARY_COLUMNS,
        combination_rows,
        markdown_table,
        pool_combinations,
        summarize,
        write_csv,
        write_table,
    )

    folder = read_pool_folder(a)
    cfg = folder.cfg
    tasks = chosen_tasks(a, cfg)
    ns = a.n or list(range(2, len(tasks)))
    bad = [n for n in ns if not 1 <= n <= len(tasks)]
    if bad or not ns:
        raise PoEError(f"--n must be between 1 and the number of tasks ({len(tasks)}), got {bad or ns}")
    check_combinations(tasks, ns, a.max_combinations)
    pool = open_pool(folder, runtime_of(a))
    test = load_split(pool.cfg, a.data_root, "test", classes=make_query(tasks, cfg.tasks).classes)
    results = pool_combinations(pool, tasks, ns, test, progress=True)
    rows = summarize(results)
    print(f"pool {pool.root}: {cfg.name}, tasks {', '.join(tasks)}")
    print(
        "accuracy: over each composite task's test images; mean and population std over combinations; "
        "multiply-adds and parameters: mean over combinations (tasks may differ in their numbers of classes)\n"
    )
    table = markdown_table(rows, SUMMARY_COLUMNS)
    print(table)
    if a.out:
        out = Path(a.out) / "combinations"
        write_table(out, table, rows)
        write_csv(f"{out}_all.csv", combination_rows(results))
        print(f"\nwrote {out}.md, {out}.csv, {out}_all.csv")
    if a.json:
        print(json.dumps(rows))
    return 0


def main_evaluation(argv: Sequence[str] | None = None) -> int:
    return run_main(evaluation_body, evaluation_parser(), argv)
