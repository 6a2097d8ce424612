"""Scoring combinations of tasks without training: PoE's consolidated model and the Oracle restricted to each
composite's classes, over every combination of n of a list of tasks; the per-n summaries of the results."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import dataclass

import torch

from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import DatasetConfig
from PoE.core.evaluate import check_covered, consolidated_logits, count_macs, count_params, score_composite
from PoE.core.query import make_query
from PoE.core.runtime import Runtime
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
