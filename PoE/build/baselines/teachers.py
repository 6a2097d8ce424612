"""What SD and UHC share: a whole student distilled from one teacher per queried task, each teacher's outputs
placed at its classes' columns of the composite."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from PoE.build.baselines.base import Context, Loss, Method

Match = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class PerTaskTeachers(Method):
    """``source``: ``scratch`` (one Scratch model per task, trained once and cached) or ``ckd`` (PoE's library +
    that task's expert); ``match``: how the student's outputs meet one teacher's (``PoE.build.losses``)."""

    def __init__(self, source: str, match: Match) -> None:
        self.source, self.match = source, match
        self.uses = ("library", "experts") if source == "ckd" else ()

    def teachers(self, ctx: Context) -> tuple[list[tuple[nn.Module, torch.Tensor]], float]:
        r, q = ctx.runner, ctx.query
        teachers, seconds = [], 0.0
        for t in q.tasks:
            if self.source == "scratch":
                teacher, sec = r.scratch_teacher(t)
                seconds += sec
            else:
                part = r.need("PoE's pool (--db)", r.pool_part)
                teacher = nn.Sequential(part(None), part(t)).to(r.device).eval()
            # a PoE expert's outputs are in its task's class order; a Scratch teacher's in ascending class id
            order = r.cfg.tasks[t] if self.source == "ckd" else sorted(r.cfg.tasks[t])
            teachers.append((teacher, torch.tensor([q.classes.index(c) for c in order], device=r.device)))
        return teachers, seconds

    def loss(self, ctx: Context) -> Loss:
        teachers, seconds = self.teachers(ctx)
        T = ctx.runner.T

        def fn(out: torch.Tensor, b) -> torch.Tensor:
            total = out.new_zeros(())
            for teacher, cols in teachers:
                with torch.no_grad():
                    t = teacher(b.x)
                total = total + self.match(out, t, cols, T)
            return total

        return Loss(fn, teacher_seconds=seconds)
