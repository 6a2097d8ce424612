"""The method comparison: the Oracle, PoE and the training-based baselines over combinations of n tasks, with the
baselines' finished runs recorded as they end so that a rerun continues where it stopped."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from PoE.build.baselines import METHODS, BaselineRunner
from PoE.build.baselines import method as baseline_method
from PoE.core.data import ImageSet
from PoE.core.errors import PoEError
from PoE.core.jsonfile import parse_json, read_text
from PoE.experiments.scoring import ComboResult, oracle_combinations, pool_combinations, sample_combinations
from PoE.query.pool import Pool

METHOD_ORDER = ["oracle", "poe", *METHODS]


@dataclass(frozen=True)
class Plan:
    """What a comparison runs: each of ``methods`` on combinations of n of ``tasks`` for each n of ``ns``; the
    Oracle and PoE on all of them, each baseline on a seeded sample of ``combos_per_n`` per n (0: all)."""

    tasks: list[str]
    ns: list[int]
    methods: list[str]
    combos_per_n: int = 0
    seed: int = 0


@dataclass(frozen=True)
class OracleSource:
    """The Oracle: ``load()`` is called only when it is compared or a baseline trains from it; ``id``, the content
    id of its files, is part of the key of each recorded run of a baseline that uses it (``record_key``)."""

    load: Callable[[], nn.Module]
    id: str = "none"


def compare(
    pool: Pool,
    plan: Plan,
    test: ImageSet,
    oracle: OracleSource,
    baseline: Callable[[str], BaselineRunner],
    record: Path | None = None,
    progress: bool = True,
) -> tuple[list[dict], list[ComboResult]]:
    """A row per method and combination of ``plan`` (the Oracle restricted to the composite's classes, PoE, and
    each baseline), and PoE's results on every combination (none without ``poe`` in ``plan.methods``: scoring it is
    most of a rerun of one baseline on a CPU). ``baseline(method)`` is called when needed.

    ``record``: a JSON-lines file to which each finished baseline run is appended as it ends; a rerun reuses the
    runs recorded there with the same method, tasks and settings and the same parts of PoE's preprocessing that
    the method trains from (``record_key``), so an interrupted comparison continues where it stopped and a
    changed pool or Oracle trains again the baselines that use it."""
    rows: list[dict] = []
    recorded = read_record(record)  # an unreadable record fails here, before any scoring
    if "oracle" in plan.methods:
        combos = [c for n in plan.ns for c in sample_combinations(plan.tasks, n, 0)]
        rows += oracle_combinations(oracle.load(), pool.cfg, combos, test, pool.runtime)
    poe = pool_combinations(pool, plan.tasks, plan.ns, test, progress=progress) if "poe" in plan.methods else []
    rows += [poe_row(pool, r) for r in poe]
    rows += baseline_rows(pool, plan, oracle.id, baseline, record, recorded)
    return rows, poe


def poe_row(pool: Pool, result: ComboResult) -> dict:
    """PoE's row of a combination; its time is that of consolidating the pool held in memory."""
    return {
        "method": "poe",
        "n": len(result.tasks),
        "tasks": " ".join(result.tasks),
        "accuracy": result.accuracy,
        "n_test": result.n_test,
        "macs": result.macs,
        "params": result.params,
        "seconds": pool.query(list(result.tasks)).build_ms / 1e3,
    }


def baseline_rows(
    pool: Pool,
    plan: Plan,
    oracle_id: str,
    baseline: Callable[[str], BaselineRunner],
    record: Path | None,
    recorded: dict[str, dict],
) -> list[dict]:
    """A row per baseline of ``plan`` and sampled combination: the run in ``recorded`` (read from ``record``) with
    the same key if there is one, else one trained now, added to ``recorded`` and appended to ``record``."""
    rows: list[dict] = []
    for method in [m for m in plan.methods if m in METHODS]:
        runner = baseline(method)
        for n in plan.ns:
            for combo in sample_combinations(plan.tasks, n, plan.combos_per_n, plan.seed):
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
    return rows


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
