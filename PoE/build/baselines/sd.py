"""SD (``sd_scratch``, ``sd_ckd``): the student's softmax over all K classes matched to each teacher's softmax,
zero-padded to K."""

from __future__ import annotations

from PoE.build.baselines.base import Method
from PoE.build.baselines.teachers import PerTaskTeachers
from PoE.build.losses import padded_kd


def build(name: str) -> Method:
    return PerTaskTeachers(name.split("_", 1)[1], padded_kd)
