"""Transfer: PoE's library frozen, a new head trained with cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F

from PoE.build.baselines.base import Context, Loss, Method


class Transfer(Method):
    uses = ("library",)
    on_library = True

    def loss(self, ctx: Context) -> Loss:
        return Loss(lambda out, b: F.cross_entropy(out, b.y))


def build(name: str) -> Method:
    return Transfer()
