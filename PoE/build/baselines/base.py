"""What every baseline method is: what it trains from, how long the paper trains it, and its loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from PoE.build.teacher import TeacherOutputs
from PoE.core.datasets import DatasetConfig
from PoE.core.loaders import Batch, TensorLoader
from PoE.core.query import Query
from PoE.core.runtime import Runtime


class Runner(Protocol):
    """What a method's loss may ask of the runner (``runner.BaselineRunner``): the Oracle, PoE's pool parts,
    Scratch teachers, the distillation settings."""

    cfg: DatasetConfig
    device: torch.device
    runtime: Runtime
    seed: int
    T: float
    alpha: float
    ckd_views: int
    teacher_dir: Path | None
    progress: bool
    oracle: Callable[[], nn.Module] | None
    pool_part: Callable[[str | None], nn.Module] | None

    def need(self, what: str, getter: Callable | None) -> Callable: ...

    def scratch_teacher(self, task: str) -> tuple[nn.Module, float]: ...


@dataclass
class Context:
    """What a method's loss is built from: the runner (Oracle, pool parts, T, alpha), the query and its loader."""

    runner: Runner
    query: Query
    loader: TensorLoader


@dataclass
class Loss:
    """A method's training loss on (network output, batch); ``teacher``: the Oracle's cached views, made before
    training; ``teacher_seconds``: time spent making per-task teachers."""

    fn: Callable[[torch.Tensor, Batch], torch.Tensor]
    teacher: TeacherOutputs | None = None
    teacher_seconds: float = 0.0


class Method:
    """A baseline: ``uses`` names the parts of PoE's preprocessing it trains from (a recorded result stays valid
    while they are unchanged); ``on_library``: the front is PoE's frozen library and only the head trains."""

    uses: tuple[str, ...] = ()
    on_library: bool = False

    @property
    def paper_epochs(self) -> int:
        """The paper's schedule: 100 epochs for a head on PoE's library, else 200."""
        return 100 if self.on_library else 200

    def loss(self, ctx: Context) -> Loss:
        raise NotImplementedError
