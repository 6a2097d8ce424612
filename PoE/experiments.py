"""Composite-task experiments: a pool scored over every combination of n of a list of tasks, beside the Oracle
and the training-based baselines; the rows, tables, CSV files and plots of Run_Evaluation and Run_Experiments."""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from PoE.build.baselines import METHODS, BaselineRunner
from PoE.build.baselines import method as baseline_method
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import DatasetConfig
from PoE.core.errors import PoEError
from PoE.core.evaluate import check_covered, consolidated_logits, count_macs, count_params, score_composite
from PoE.core.jsonfile import parse_json, read_text
from PoE.core.query import make_query
from PoE.core.runtime import Runtime
from PoE.core.store import atomic_write
from PoE.query.pool import Pool


@dataclass
class ComboResult:
    tasks: tuple[str, ...]
    accuracy: float
    n_test: int
    cross_errors: int
    errors: int
    macs: int
    params: int


def pool_combinations(
    pool: Pool, tasks: list[str], ns: list[int], test: ImageSet, progress: bool = False
) -> list[ComboResult]:
    """Score the train-free consolidated model of every combination of n of ``tasks``, for each n.

    The consolidated model of all ``tasks`` runs once over their test images; each combination is then scored from
    its columns (a combination's model computes the same logits for its classes: ``score_composite``).
    """
    cfg, device = pool.cfg, pool.device
    for t in tasks:
        pool.make_query([t])  # a missing expert fails here, naming its file
    experts = {t: pool.experts[t] for t in tasks}
    whole = pool.query(tasks)
    check_covered(test.y, whole.classes, cfg.class_name)
    subset, _ = test.with_classes(whole.classes)
    logits = consolidated_logits(whole.module, subset, Normalizer(cfg.mean, cfg.std, device), pool.runtime, progress)
    shape = (3, cfg.image_size, cfg.image_size)
    lib_macs, lib_params = count_macs(pool.library, shape, device), count_params(pool.library)
    with torch.no_grad():
        feat = pool.library(torch.zeros(1, *shape, device=device)).shape[1:]
    cost = {t: (count_macs(e, tuple(feat), device), count_params(e)) for t, e in experts.items()}
    results = []
    for n in ns:
        for combo in itertools.combinations(tasks, n):
            query = make_query(combo, cfg.tasks)
            acc, n_test, cross, wrong = score_composite(query, logits, whole.classes, subset.y)
            macs = lib_macs + sum(cost[t][0] for t in combo)
            params = lib_params + sum(cost[t][1] for t in combo)
            results.append(ComboResult(combo, acc, n_test, cross, wrong, macs, params))
    return results


def summarize(results: list[ComboResult]) -> list[dict]:
    """Per n: combinations, mean and (population) std of accuracy, cross-expert share, mean cost (rounded)."""
    rows = []
    for n in sorted({len(r.tasks) for r in results}):
        rs = [r for r in results if len(r.tasks) == n]
        accs = [r.accuracy for r in rs]
        shares = [100.0 * r.cross_errors / r.errors for r in rs if r.errors]
        rows.append(
            {
                "n": n,
                "combinations": len(rs),
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.pstdev(accs),
                "acc_min": min(accs),
                "acc_max": max(accs),
                "cross_expert_error_share": statistics.fmean(shares) if shares else float("nan"),
                "macs": round(statistics.fmean(r.macs for r in rs)),
                "params": round(statistics.fmean(r.params for r in rs)),
            }
        )
    return rows


def combination_rows(results: list[ComboResult]) -> list[dict]:
    """One row per combination."""
    return [
        {
            "n": len(r.tasks),
            "tasks": " ".join(r.tasks),
            "accuracy": r.accuracy,
            "n_test": r.n_test,
            "cross_expert_errors": r.cross_errors,
            "errors": r.errors,
            "macs": r.macs,
            "params": r.params,
        }
        for r in results
    ]


def compare(
    pool: Pool,
    tasks: list[str],
    ns: list[int],
    methods: list[str],
    test: ImageSet,
    oracle: Callable[[], nn.Module],
    baseline: Callable[[str], BaselineRunner],
    combos_per_n: int,
    seed: int = 0,
    progress: bool = True,
    record: Path | None = None,
    oracle_id: str = "none",
) -> tuple[list[dict], list[ComboResult]]:
    """A row per method and combination of n of ``tasks`` (the Oracle restricted to the composite's classes, PoE,
    and each baseline of ``methods`` on a seeded sample of ``combos_per_n`` combinations per n, 0: all), and
    PoE's results on every combination (none without ``poe`` in ``methods``: scoring it is most of a rerun of one
    baseline on a CPU). ``oracle()`` and ``baseline(method)`` are called when needed.

    ``record``: a JSON-lines file to which each finished baseline run is appended as it ends; a rerun reuses the
    runs recorded there with the same method, tasks and settings and the same parts of PoE's preprocessing that
    the method trains from (``record_key``), so an interrupted comparison continues where it stopped and a
    changed pool or Oracle trains again the baselines that use it."""
    rows: list[dict] = []
    recorded = read_record(record)
    if "oracle" in methods:
        combos = [c for n in ns for c in sample_combinations(tasks, n, 0)]
        rows += oracle_combinations(oracle(), pool.cfg, combos, test, pool.runtime)
    poe = pool_combinations(pool, tasks, ns, test, progress=progress) if "poe" in methods else []
    if poe:
        for r in poe:
            rows.append(
                {
                    "method": "poe",
                    "n": len(r.tasks),
                    "tasks": " ".join(r.tasks),
                    "accuracy": r.accuracy,
                    "n_test": r.n_test,
                    "macs": r.macs,
                    "params": r.params,
                    "seconds": pool.query(list(r.tasks)).build_ms / 1e3,
                }
            )
    for method in [m for m in methods if m in METHODS]:
        runner = baseline(method)
        for n in ns:
            for combo in sample_combinations(tasks, n, combos_per_n, seed):
                key = record_key(method, combo, runner.fingerprint(), pool, oracle_id)
                if key not in recorded:
                    r = runner.run(method, list(combo))
                    recorded[key] = {
                        "method": method,
                        "n": n,
                        "tasks": " ".join(combo),
                        "accuracy": r.accuracy,
                        "n_test": r.n_test,
                        "macs": r.macs,
                        "params": r.params,
                        "seconds": r.seconds,
                        "teacher_seconds": r.teacher_seconds,
                    }
                    append_record(record, key, recorded[key])
                rows.append(recorded[key])
    return rows, poe


def record_key(method: str, combo: tuple[str, ...], fingerprint: str, pool: Pool, oracle_id: str) -> str:
    """A baseline run's identity: method, tasks, settings, and the content ids of the parts it uses
    (the method's ``uses``: the library, the query's experts, the Oracle's files; Scratch and its teachers use none)."""
    uses = baseline_method(method).uses
    parts = [pool.part_id(None)] if "library" in uses else []
    parts += [pool.part_id(t) for t in combo] if "experts" in uses else []
    parts += [oracle_id] if "oracle" in uses else []
    return " ".join([method, *combo, fingerprint, *parts])


MAX_RECORD_BYTES = 256 * 2**20  # the record of baseline runs: a line of under 1 KB per run


def read_record(path: Path | None) -> dict[str, dict]:
    """The runs recorded in ``path`` by key (a line cut short by an interruption is ignored)."""
    runs: dict[str, dict] = {}
    if path is None or not os.path.lexists(path):
        return runs
    for line in read_text(path, "the record of baseline runs", "a JSON-lines file", MAX_RECORD_BYTES).splitlines():
        try:
            item = parse_json(line, str(path))
            runs[item["key"]] = item["row"]
        except (PoEError, KeyError, TypeError):
            continue
    return runs


def append_record(path: Path | None, key: str, row: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"key": key, "row": row}) + "\n")


def cross_expert_rows(
    pools: dict[str, Pool], both: list[ComboResult], tasks: list[str], ns: list[int], test: ImageSet
) -> list[dict]:
    """Per pool (named by the losses its experts were trained with) and n: accuracy and the share of errors that
    are cross-expert errors. The pool named 'both' is the main one, whose results ``both`` are reused."""
    rows = []
    for name, pool in pools.items():
        results = both if name == "both" else pool_combinations(pool, tasks, ns, test)
        for r in summarize(results):
            rows.append(
                {
                    "experts trained with": name,
                    "n": r["n"],
                    "accuracy": r["acc_mean"],
                    "cross-expert errors / errors (%)": r["cross_expert_error_share"],
                }
            )
    return rows


SUMMARY_COLUMNS = [
    ("n", "n"),
    ("combinations", "combinations"),
    ("acc_mean", "accuracy mean (%)"),
    ("acc_std", "std"),
    ("acc_min", "min"),
    ("acc_max", "max"),
    ("cross_expert_error_share", "cross-expert errors / errors (%)"),
    ("macs", "multiply-adds"),
    ("params", "parameters"),
]
METHOD_COLUMNS = [
    ("method", "method"),
    ("n", "n"),
    ("combinations", "combinations"),
    ("acc_mean", "accuracy (%)"),
    ("acc_std", "std"),
    ("macs", "multiply-adds"),
    ("params", "parameters"),
    ("seconds_per_query", "time per query (s)"),
]


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, heading) pairs; floats get two decimals, or two significant digits under 0.01 (PoE's
    time per query is a fraction of a millisecond: 0.00 would hide it)."""

    def cell(v: object) -> str:
        if isinstance(v, float) and 0 < abs(v) < 0.01:
            return np.format_float_positional(v, precision=2, unique=False, fractional=False)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_csv(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ in their optional keys
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_table(stem: str | Path, text: str, rows: list[dict[str, Any]]) -> None:
    """``<stem>.md`` (the table as printed) and ``<stem>.csv`` (its rows)."""
    write_text(f"{stem}.md", text + "\n")
    write_csv(f"{stem}.csv", rows)


def sample_combinations(tasks: list[str], n: int, k: int | None, seed: int = 0) -> list[tuple[str, ...]]:
    """All combinations of n tasks, or a fixed seeded sample of ``k`` of them (in their natural order)."""
    combos = list(itertools.combinations(tasks, n))
    if not k or k >= len(combos):
        return combos
    g = torch.Generator().manual_seed(seed * 1000 + n)
    keep = sorted(torch.randperm(len(combos), generator=g)[:k].tolist())
    return [combos[i] for i in keep]


@torch.no_grad()
def oracle_combinations(
    oracle: torch.nn.Module,
    cfg: DatasetConfig,
    combos: list[tuple[str, ...]],
    test: ImageSet,
    runtime: Runtime,
) -> list[dict]:
    """The Oracle restricted to each composite's classes (argmax over those columns), one forward in all."""
    classes = sorted({c for combo in combos for t in combo for c in cfg.tasks[t]})
    subset, _ = test.with_classes(classes)
    normalize = Normalizer(cfg.mean, cfg.std, runtime.device)
    full = consolidated_logits(oracle, subset, normalize, runtime.fp32)
    shape = (3, cfg.image_size, cfg.image_size)
    macs, params = count_macs(oracle, shape, runtime.device), count_params(oracle)
    rows = []
    for combo in combos:
        query = make_query(combo, cfg.tasks)
        acc, n_test, _, _ = score_composite(query, full, range(cfg.num_classes), subset.y)
        rows.append(
            {
                "method": "oracle",
                "n": len(combo),
                "tasks": " ".join(combo),
                "accuracy": acc,
                "n_test": n_test,
                "macs": macs,
                "params": params,
                "seconds": 0.0,
            }
        )
    return rows


def summarize_methods(rows: list[dict]) -> list[dict]:
    """Per (method, n): combinations, accuracy mean and population std, mean cost and time per query."""
    out = []
    keys = sorted({(r["method"], r["n"]) for r in rows}, key=lambda k: (METHOD_ORDER.index(k[0]), k[1]))
    for method, n in keys:
        rs = [r for r in rows if r["method"] == method and r["n"] == n]
        accs = [r["accuracy"] for r in rs]
        out.append(
            {
                "method": method,
                "n": n,
                "combinations": len(rs),
                "acc_mean": statistics.fmean(accs),
                "acc_std": statistics.pstdev(accs),
                "macs": round(statistics.fmean(r["macs"] for r in rs)),
                "params": round(statistics.fmean(r["params"] for r in rs)),
                "seconds_per_query": statistics.fmean(r["seconds"] for r in rs),
            }
        )
    return out


def same_combination_rows(rows: list[dict]) -> list[dict]:
    """One row per combination that a baseline ran on: every method's accuracy on that same combination (the
    baselines run on a sample; the per-n means of the Oracle and PoE are over all combinations)."""
    sampled = sorted({r["tasks"] for r in rows if r["method"] in METHODS}, key=lambda t: (len(t.split()), t))
    out = []
    for tasks in sampled:
        acc = {r["method"]: r["accuracy"] for r in rows if r["tasks"] == tasks}
        out.append({"n": len(tasks.split()), "tasks": tasks, **{m: acc[m] for m in METHOD_ORDER if m in acc}})
    return out


METHOD_ORDER = ["oracle", "poe", *METHODS]


def plot_results(summary: list[dict], out_dir: Path, title: str, paired: list[dict] | None = None) -> list[Path]:
    """accuracy_vs_n.png and accuracy_vs_time.png (time per query on a log axis). ``paired``
    (``same_combination_rows``): PoE is also drawn on the baselines' sampled combinations, dashed, since the
    baselines' points are those combinations and PoE's solid line is the mean over all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import textwrap

    import matplotlib.pyplot as plt

    title = "\n".join(textwrap.wrap(title, 90))  # a long task list would run off the figure
    out_dir.mkdir(parents=True, exist_ok=True)
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in summary)]
    ns = sorted({r["n"] for r in summary})
    markers = dict(zip(ns, "osD^vP*X", strict=False))  # accuracy_vs_time: one marker shape per n, no labels
    paths = []
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for i, m in enumerate(methods):
        rs = [r for r in summary if r["method"] == m]
        shift = (i - (len(methods) - 1) / 2) * 0.04  # side by side, so error bars do not hide each other
        ax.errorbar(
            [r["n"] + shift for r in rs],
            [r["acc_mean"] for r in rs],
            yerr=[r["acc_std"] for r in rs],
            marker="o",
            capsize=3,
            label=m,
        )
    sampled = [r for r in paired or [] if "poe" in r]
    if sampled:
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = cycle[methods.index("poe") % len(cycle)] if "poe" in methods else None
        ax.plot(
            [r["n"] for r in sampled],
            [r["poe"] for r in sampled],
            linestyle="--",
            marker="x",
            color=color,
            label="poe, the baselines' combinations",
        )
    ax.set_xticks(ns)  # n is a count of tasks: whole numbers only
    ax.set_xlabel("primitive tasks in the query (n)")
    ax.set_ylabel("accuracy on the composite task (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)  # outside: hides nothing
    paths.append(out_dir / "accuracy_vs_n.png")
    save_figure(fig, paths[-1])
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    timed = {m for m in methods if any(r["method"] == m and r["seconds_per_query"] > 0 for r in summary)}
    for i, m in enumerate(methods):
        for r in (r for r in summary if r["method"] == m and r["seconds_per_query"] > 0):
            ax.scatter(
                r["seconds_per_query"], r["acc_mean"], color=colors[i % len(colors)], marker=markers[r["n"]], s=36
            )
    from matplotlib.lines import Line2D

    # the legend names what is drawn: the Oracle is not built per query (time 0), which a log axis cannot show
    handles = [
        Line2D([], [], color=colors[i % len(colors)], marker="o", linestyle="", label=m)
        for i, m in enumerate(methods)
        if m in timed
    ]
    untimed = [m for m in methods if m not in timed]
    if untimed:
        ax.text(
            0.0,
            -0.2,
            f"not drawn (no model built per query, time 0): {', '.join(untimed)}",
            transform=ax.transAxes,
            fontsize=7,
            color="gray",
            va="top",
        )
    handles += [Line2D([], [], color="gray", marker=markers[n], linestyle="", label=f"n = {n}") for n in ns]
    ax.set_xscale("log")
    ax.set_xlabel("time to produce the model for a query (s, log scale)")
    ax.set_ylabel("accuracy on the composite task (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    paths.append(out_dir / "accuracy_vs_time.png")
    save_figure(fig, paths[-1])
    return paths


def replot(out_dir: Path, title: str) -> list[Path]:
    """Redraw the plots from the tables ``Run_Experiments.py`` wrote into ``out_dir`` (composite_tasks.csv and
    same_combinations.csv), without scoring or training anything."""

    def rows(name: str) -> list[dict[str, Any]]:
        path = out_dir / name
        if not path.is_file():
            return []
        with open(path, newline="") as f:
            return [
                {k: v if k in ("method", "tasks") else int(v) if k == "n" else float(v) for k, v in r.items()}
                for r in csv.DictReader(f)
            ]

    return plot_results(rows("composite_tasks.csv"), out_dir, title, rows("same_combinations.csv"))


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
