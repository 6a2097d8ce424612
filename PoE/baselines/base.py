"""What every baseline method is: what it trains from, how long the paper trains it, and its loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from PoE.data import Batch, TensorLoader
from PoE.query import Query
from PoE.teacher import TeacherOutputs

if TYPE_CHECKING:
    from PoE.baselines.runner import BaselineRunner


@dataclass
class Context:
    """What a method's loss is built from: the runner (Oracle, pool parts, T, alpha), the query and its loader."""

    runner: BaselineRunner
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
