"""Train-free knowledge consolidation: library + queried experts -> one compact task-specific network.

The queried experts become one expert bank (``PoE.core.networks.bank_of``: their weights side by side, one grouped
kernel per layer), so the consolidated network is two modules, library then bank, whatever the query's size.
``merge`` is the one rule that puts experts' logits together; the consolidated network applies it to its
bank's output, the service's batched forward and the combination scoring in ``evaluate`` to theirs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from PoE.core.query import Query


def merge(expert_logits: list[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
    """The experts' logits side by side (query order, each expert's own class order), then reordered so
    that column i is the query's i-th class in ascending class id (``Query.order``)."""
    return torch.cat(expert_logits, dim=1).index_select(1, order)


class ConsolidatedNet(nn.Module):
    """The shared library, then the bank of the queried experts (in query order) on its features; logits in
    ascending class id."""

    def __init__(self, library: nn.Module, bank: nn.Module, query: Query) -> None:
        super().__init__()
        self.library, self.bank = library, bank
        self.tasks = list(query.tasks)
        self.classes = query.classes
        self.register_buffer("order", torch.tensor(query.order, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return merge([self.bank(self.library(x))], self.order)


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
        bf16 = self.precision == "bf16"
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            return self.model(x).float()
