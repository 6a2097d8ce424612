"""How fast the service builds a model in memory: ``Pool.query`` (validate the query, consolidate the
library and the queried experts; no disk, no data), timed over many repetitions.

    python benchmarks/build_speed.py                       # the shipped pool, people vehicles_1 vehicles_2
    python benchmarks/build_speed.py --repeat 20000 --out results/service/build_speed.md

Goal: median <= 1 ms, p99 <= 5 ms. Opening the pool (reading and checking every part) happens once, at
start-up, and is reported apart.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.checkpoint import atomic_write
from PoE.query.pool import Pool

GOAL_MEDIAN_MS, GOAL_P99_MS = 1.0, 5.0


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q / 100 * (len(sorted_ms) - 1)))]


def machine() -> str:
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return f"{os.cpu_count()} CPUs, load average {load} (1 / 5 / 15 min) at the start"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--dataset", default="cifar100")
    p.add_argument("--tasks", nargs="+", default=["people", "vehicles_1", "vehicles_2"])
    p.add_argument("--repeat", type=int, default=10_000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    a = p.parse_args(argv)

    where = machine()
    t0 = time.perf_counter()
    pool = Pool.open(a.db, a.dataset, device="cpu")
    open_ms = (time.perf_counter() - t0) * 1e3
    for _ in range(a.warmup):
        pool.query(a.tasks)
    times = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        pool.query(a.tasks)
        times.append((time.perf_counter() - t) * 1e3)
    gc.collect()
    times.sort()
    med, p99 = statistics.median(times), percentile(times, 99)
    ok = lambda v, goal: "yes" if v <= goal else "**no**"  # noqa: E731
    rows = [
        "| measure | result | goal | met |",
        "| --- | --- | --- | --- |",
        f"| build of a {len(a.tasks)}-task model ({', '.join(a.tasks)}), median | {med:.3f} ms "
        f"| <= {GOAL_MEDIAN_MS:g} ms | {ok(med, GOAL_MEDIAN_MS)} |",
        f"| same, p99 | {p99:.3f} ms | <= {GOAL_P99_MS:g} ms | {ok(p99, GOAL_P99_MS)} |",
        f"| same, p90 / p99.9 / max | {percentile(times, 90):.3f} / {percentile(times, 99.9):.3f} / {times[-1]:.3f} ms "
        "| | |",
        f"| opening the pool (once per server: read and check every part) | {open_ms:.0f} ms | | |",
    ]
    table = "\n".join(rows) + f"\n\n{a.repeat:,} builds after {a.warmup} warm-up builds; {where}.\n"
    print(table)
    if a.out:
        atomic_write(a.out, lambda f: f.write(table.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
