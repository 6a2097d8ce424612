"""CKD: PoE's library frozen, a new head distilled from the Oracle's logits on the composite's classes
(``L_soft + alpha * L1``): conditional knowledge distillation for the composite task itself."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from PoE.build.baselines.base import Context, Loss, Method
from PoE.build.losses import ckd_loss
from PoE.build.teacher import TeacherOutputs
from PoE.core.checkpoint import state_id


class CKD(Method):
    uses = ("library", "oracle")
    on_library = True

    def loss(self, ctx: Context) -> Loss:
        r, q = ctx.runner, ctx.query
        oracle = r.need("the Oracle (--pretrained)", r.oracle)().to(r.device).eval()
        cols = torch.tensor(q.classes, device=r.device)
        cached = None
        if r.ckd_views:  # the Oracle's logits from cached augmented views, made once per query
            folder = r.teacher_dir or Path(tempfile.mkdtemp(prefix="poe-ckd-"))
            cached = TeacherOutputs(
                oracle,
                state_id(oracle),
                r.ckd_views,
                r.seed,
                folder / f"ckd_{'+'.join(sorted(q.tasks))}",
                r.runtime,
                r.progress,
            )
        logits = cached or TeacherOutputs(oracle, "", 0, r.seed, Path("."), r.runtime, progress=False)
        return Loss(lambda out, b: ckd_loss(out, logits.logits(b, ctx.loader)[:, cols], r.T, r.alpha), cached)


def build(name: str) -> Method:
    return CKD()
