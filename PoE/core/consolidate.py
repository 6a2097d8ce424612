"""Train-free knowledge consolidation: library + queried experts -> one compact task-specific network.

The queried experts become one expert bank (``PoE.core.networks.bank_of``: their weights side by side, one grouped
kernel per layer), so the consolidated network is two modules, library then bank, whatever the query's size.
``forward`` is the one consolidated forward: a model's own (``ConsolidatedNet``), the service's batches of several
queries, and through the model the exports and the combination scoring in ``evaluate``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from PoE.core.query import Query
from PoE.core.runtime import Runtime

Experts = Callable[[Sequence[str], torch.Tensor], torch.Tensor]
"""Runs the experts ``tasks`` on feature rows and returns their logits side by side, in that order."""


@dataclass(frozen=True)
class Rows:
    """A query's rows in a batch: its experts (query order), how many images, and its ``merge`` order."""

    tasks: Sequence[str]
    count: int
    order: torch.Tensor


def merge(expert_logits: Sequence[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """The experts' logits side by side (query order, each expert's own class order), then reordered so
    that column i is the query's i-th class in ascending class id (``Query.order``)."""
    return torch.cat(list(expert_logits), dim=1).index_select(1, order)


def forward(
    library: Callable[[torch.Tensor], torch.Tensor],
    experts: Experts,
    classes: Mapping[str, int],
    x: torch.Tensor,
    groups: Sequence[Rows],
    union: bool = True,
) -> list[torch.Tensor]:
    """The consolidated forward, for one query or a batch of several: the library once on every row, the experts
    on its features, then per query its experts' logits merged (``merge``). ``classes``: each expert's class count.

    ``union``: one run of every expert the batch queried, on every row (a bank: one grouped kernel per layer, what
    a GPU runs best); else each expert once, on the rows of the queries that asked for it (where experts run one
    by one, as on a CPU, the union would run every expert on every row)."""
    features = library(x)
    if len(groups) == 1 or union:
        tasks = list(groups[0].tasks) if len(groups) == 1 else sorted({t for g in groups for t in g.tasks})
        cols = dict(zip(tasks, experts(tasks, features).float().split([classes[t] for t in tasks], 1), strict=True))
        parts = [[cols[t] for t in groups[0].tasks]] if len(groups) == 1 else by_rows(groups, cols)
    else:
        parts = apart(experts, features, groups)
    return [merge(p, g.order) for p, g in zip(parts, groups, strict=True)]


def by_rows(groups: Sequence[Rows], cols: dict[str, torch.Tensor]) -> list[list[torch.Tensor]]:
    """Per query, the rows of its experts' logits computed on every row."""
    starts = [0, *itertools.accumulate(g.count for g in groups)]
    return [[cols[t][a:b] for t in g.tasks] for g, a, b in zip(groups, starts[:-1], starts[1:], strict=True)]


def apart(experts: Experts, features: torch.Tensor, groups: Sequence[Rows]) -> list[list[torch.Tensor]]:
    """Per query, its experts' logits: each expert run once, on the rows of the queries that asked for it only."""
    queried: dict[str, list[int]] = {}  # per expert: the queries that asked for it, in batch order
    for k, g in enumerate(groups):
        for t in g.tasks:
            queried.setdefault(t, []).append(k)
    starts = [0, *itertools.accumulate(g.count for g in groups)]
    out: dict[str, torch.Tensor] = {}
    first: list[dict[str, int]] = [{} for _ in groups]  # per query: its first row in each of its experts' outputs
    for t, ks in queried.items():
        rows = features
        if len(ks) < len(groups):
            index = [r for k in ks for r in range(starts[k], starts[k + 1])]
            rows = features.index_select(0, torch.tensor(index, device=features.device))
        out[t] = experts([t], rows).float()
        at = 0
        for k in ks:
            first[k][t], at = at, at + groups[k].count
    return [[out[t][f[t] : f[t] + g.count] for t in g.tasks] for g, f in zip(groups, first, strict=True)]


class ConsolidatedNet(nn.Module):
    """The shared library, then the queried experts (in query order) on its features; logits in ascending class
    id. ``experts``: their bank (one grouped kernel per layer) or ``SideBySide`` (separate branches, for ONNX)."""

    def __init__(self, library: nn.Module, experts: nn.Module, query: Query) -> None:
        super().__init__()
        self.library, self.bank = library, experts
        self.tasks = list(query.tasks)
        self.classes = query.classes
        self.sizes = {t: len(c) for t, c in zip(query.tasks, query.task_classes, strict=True)}
        self.register_buffer("order", torch.tensor(query.order, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = Rows(self.tasks, x.shape[0], self.order)
        return forward(self.library, lambda _tasks, f: self.bank(f), self.sizes, x, [rows])[0]


class SideBySide(nn.Module):
    """Experts as separate branches on the same features, their logits side by side: the bank's function as a
    plain graph of ordinary convolutions (what ONNX runtimes fuse and quantize well)."""

    def __init__(self, experts: Sequence[nn.Module]) -> None:
        super().__init__()
        self.experts = nn.ModuleList(experts)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([e(features) for e in self.experts], dim=1)


class RawInput(nn.Module):
    """The exported form: takes float RGB in [0, 1] (N x 3 x size x size), checks the range, normalises,
    and runs the model (under bfloat16 autocast when ``precision`` is bf16); returns float32 logits."""

    def __init__(
        self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], size: int, precision: str
    ) -> None:
        super().__init__()
        self.model, self.size, self.precision = model, size, precision
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # image height and width are dynamic in the exported graph only so that a wrong size gets this message
        # rather than a shape guard's; the range check catches 0..255 pixels, which would otherwise answer wrong
        size = torch.scalar_tensor(x.shape[2] * 100_000 + x.shape[3])
        torch._assert_async(size == self.size * 100_001, f"input must be N x 3 x {self.size} x {self.size} images")
        torch._assert_async(
            ((x >= 0) & (x <= 1)).all(),
            "input must be float RGB in [0, 1], N x 3 x H x W; divide uint8 pixels (0..255) by 255",
        )
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        with Runtime(torch.device("cpu"), self.precision).autocast():  # exports are CPU graphs
            return self.model(x).float()
