"""Run_Experiments.py: the paper's comparisons (Oracle, PoE, baselines; cross-expert errors) as tables and plots."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from PoE.build.baselines import METHODS
from PoE.cli.baselines import baseline_arguments, runners
from PoE.cli.common import (
    NONNEG_INT,
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


def experiments_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Experiments.py",
        description="The paper's comparisons: for n tasks out of a list, the Oracle (restricted to the composite's "
        "classes), PoE and the training-based baselines: accuracy (mean +- std over combinations), multiply-adds, "
        "parameters and time per query; and the cross-expert error share of pools extracted with L_soft only, "
        "L_scale only and both. Writes Markdown and CSV tables and PNG plots.",
        epilog=tasks_epilog(default_tasks=True),
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="default: the dataset's six")
    p.add_argument("--n", nargs="+", type=POSITIVE_INT, default=[2, 3, 4, 5], help="combination sizes")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["oracle", "poe", *METHODS],
        choices=["oracle", "poe", *METHODS],
        metavar="METHOD",
        help=f"oracle (restricted to each composite's classes), poe, and the baselines {', '.join(METHODS)}",
    )
    p.add_argument(
        "--combos_per_n",
        type=NONNEG_INT,
        default=2,
        help="baselines: a fixed seeded sample of this many "
        "combinations per n (0: all); the Oracle and PoE are always scored on all",
    )
    p.add_argument(
        "--ablation",
        nargs="*",
        default=[],
        metavar="NAME=DB",
        help="pools for the cross-expert table, e.g. soft=DB_soft scale=DB_scale (the --db pool is 'both')",
    )
    p.add_argument(
        "--out",
        default="runs/experiments",
        metavar="FOLDER",
        help="folder for the tables and plots (the "
        "shipped ones in addImg/ were written with --out addImg), and "
        "baseline_runs.jsonl: each finished baseline run, reused by a rerun with the same settings (an "
        "interrupted comparison continues; delete the file to train them again)",
    )
    combinations_argument(p)
    p.add_argument(
        "--max_trainings",
        type=POSITIVE_INT,
        default=MAX_TRAININGS,
        help="refuse to start when the baselines would train more models than this (combinations x methods; "
        "each one trains for the baselines' epochs)",
    )
    baseline_arguments(p)
    return p


MAX_TRAININGS = 100  # baseline models one comparison trains unless --max_trainings says more


def check_trainings(tasks: list[str], ns: list[int], methods: list[str], k: int, limit: int) -> None:
    """Refuse, before anything is trained, a comparison whose baselines would train more than ``limit`` models
    (``k``: --combos_per_n, 0 for all), saying how many and how to ask for fewer."""
    counts = [math.comb(len(tasks), n) for n in ns]
    baselines = [m for m in methods if m in METHODS]
    per_method = sum(min(k or c, c) for c in counts)
    if per_method * len(baselines) <= limit:
        return
    fits = 0
    while fits < max(counts) and sum(min(fits + 1, c) for c in counts) * len(baselines) <= limit:
        fits += 1
    hint = f"--combos_per_n {fits} or less, " if fits else ""
    raise PoEError(
        f"the baselines would train {per_method * len(baselines):,} models ({len(baselines)} method(s) x "
        f"{per_method:,} combination(s) at --combos_per_n {k}{' (all)' if not k else ''}), over the limit of "
        f"{limit:,}: give {hint}fewer --methods or --n, or raise --max_trainings"
    )


def ablation_pools(items: list[str]) -> dict[str, str]:
    """``--ablation NAME=DB ...`` as {name: pool folder}."""
    ablation = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PoEError(f"--ablation takes NAME=DB pairs (e.g. soft=DB_soft), got {item!r}")
        ablation[name] = path
    return ablation


def experiments_body(a: argparse.Namespace) -> int:
    from functools import cache

    from PoE.build.baselines import load_oracle, oracle_files
    from PoE.core.datasets import load_split
    from PoE.core.store import check_writable, files_id
    from PoE.experiments import (
        METHOD_COLUMNS,
        compare,
        cross_expert_rows,
        markdown_table,
        plot_results,
        same_combination_rows,
        summarize_methods,
        write_csv,
        write_table,
    )
    from PoE.query.pool import Pool

    folder = read_pool_folder(a)
    cfg = folder.cfg
    tasks = chosen_tasks(a, cfg)
    if not a.n or any(not 1 <= n <= len(tasks) for n in a.n):
        raise PoEError(f"--n must be between 1 and the number of tasks ({len(tasks)}), got {a.n}")
    check_combinations(tasks, a.n, a.max_combinations)  # the Oracle and PoE score every one
    check_trainings(tasks, a.n, a.methods, a.combos_per_n, a.max_trainings)
    check_writable(a.out)  # before any training: the record of finished runs and the tables go there
    ablation = ablation_pools(a.ablation)
    if ablation and "poe" not in a.methods:
        raise PoEError("--ablation compares pools with PoE's cross-expert errors: add poe to --methods")
    runtime = runtime_of(a)
    device = runtime.device
    pool = open_pool(folder, runtime.fp32)
    test = load_split(cfg, a.data_root, "test")
    train = cache(lambda: load_split(cfg, a.data_root, "train"))
    rows, poe = compare(
        pool,
        tasks,
        a.n,
        a.methods,
        test,
        oracle=lambda: load_oracle(a.pretrained, cfg, device),
        baseline=runners(a, cfg, runtime, train, test, lambda: pool),
        combos_per_n=a.combos_per_n,
        seed=a.seed,
        progress=not a.no_progress,
        record=Path(a.out) / "baseline_runs.jsonl",
        oracle_id=files_id(oracle_files(a.pretrained, cfg)),
    )
    schedule_note = ""
    epochs_text = a.epochs or ("the paper's" if a.budget == 1 else f"{a.budget:g} x the paper's")
    if any(m in METHODS for m in a.methods):
        schedule_note = (
            f"baselines: {a.combos_per_n or 'all'} combination(s) per n (seed {a.seed}), SGD lr {a.lr}, batch "
            f"{a.batch_size}, {a.schedule} schedule, {epochs_text} epochs, trained in "
            f"{runtime.precision}"
            f"{f', ckd from {a.ckd_views} cached Oracle views' if a.ckd_views else ''}; every accuracy scored in fp32; "
        )
    summary = summarize_methods(rows)
    every = " and ".join(m for m, name in (("Oracle", "oracle"), ("PoE", "poe")) if name in a.methods)
    poe_time = (
        f"PoE time = consolidating the pool held in memory (no training; opening and checking the pool once "
        f"took {pool.open_ms:.0f} ms)."
    )
    note = (
        f"{cfg.name}, pool {pool.root}, tasks {', '.join(tasks)}, device {device}. {schedule_note}"
        f"{f'{every}: every combination. ' if every else ''}{poe_time if poe else ''}"
    ).strip()
    table = markdown_table(summary, METHOD_COLUMNS)
    print(note + "\n\n" + table)
    out = Path(a.out)
    write_table(out / "composite_tasks", note + "\n\n" + table, summary)
    write_csv(out / "composite_tasks_all.csv", rows)
    paired = same_combination_rows(rows)
    if paired:
        ptable = markdown_table(paired, [(k, k) for k in paired[0]])
        print("\naccuracy (%) of every method on the combinations the baselines ran on:\n" + ptable)
        write_table(out / "same_combinations", ptable, paired)
    plot_results(summary, out, f"{cfg.name}: {', '.join(tasks)}", paired)
    if poe:  # PoE's table: the share of its errors that are cross-expert errors, per pool
        pools = {"both": pool, **{k: Pool.open(v, cfg.name, runtime=runtime.fp32) for k, v in ablation.items()}}
        cross = cross_expert_rows(pools, poe, tasks, a.n, test)
        ctable = markdown_table(cross, [(k, k) for k in cross[0]])
        print("\n" + ctable)
        write_table(out / "cross_expert_errors", ctable, cross)
    elif (out / "cross_expert_errors.md").exists():  # from an earlier run: not this run's, and not rewritten
        print(
            f"\nnote: {out}/cross_expert_errors.{{md,csv}} are an earlier run's: without poe in --methods they "
            "are not made again"
        )
    print(
        f"\nwrote {out}/composite_tasks.{{md,csv}}, composite_tasks_all.csv, "
        f"{'cross_expert_errors.{md,csv}, ' if poe else ''}{'same_combinations.{md,csv}, ' if paired else ''}"
        f"accuracy_vs_n.png, accuracy_vs_time.png"
    )
    return 0


def main_experiments(argv: Sequence[str] | None = None) -> int:
    return run_main(experiments_body, experiments_parser(), argv)
