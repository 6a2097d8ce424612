"""UHC (``uhc_scratch``, ``uhc_ckd``): the student's softmax restricted (renormalised) to each teacher's classes
matched to that teacher's softmax."""

from __future__ import annotations

from PoE.build.baselines.base import Method
from PoE.build.baselines.teachers import PerTaskTeachers
from PoE.build.losses import restricted_kd


def build(name: str) -> Method:
    return PerTaskTeachers(name.split("_", 1)[1], restricted_kd)
