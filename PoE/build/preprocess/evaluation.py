"""The run's scoring of its parts on the test images, split over the ranks under torchrun."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from PoE.build import distributed
from PoE.core.errors import PoEError
from PoE.core.evaluate import accuracy

if TYPE_CHECKING:
    from PoE.build.preprocess.data import RunData
    from PoE.build.preprocess.record import Report
    from PoE.build.preprocess.settings import Execution


class Evaluator:
    """Scores parts on the run's test images; ``report`` counts them (an --oracle file is scored every run)."""

    def __init__(self, data: RunData, execution: Execution, test_limit: int | None, report: Report) -> None:
        self.data, self.execution, self.test_limit, self.report = data, execution, test_limit, report

    def evaluate(self, model: nn.Module, classes: list[int] | None, restrict: bool = False) -> tuple[float, int]:
        """Test accuracy (%) and image count. Several ranks each score every world-th test image and add up
        their counts, so all of them get the single-process numbers in a fraction of the time."""
        self.report.evaluated += 1
        rank, world, test = distributed.rank(), distributed.world(), self.data.test_set
        if world > 1:
            test = test.subset(torch.arange(rank, len(test), world))
        progress = self.execution.progress and rank == 0
        acc, n = accuracy(model, test, classes, self.data.normalize, self.execution.runtime, restrict, progress)
        if self.test_limit and distributed.total([n])[0] == 0:
            raise PoEError(f"--test_limit {self.test_limit} keeps no test image of classes {classes}: raise it")
        if world == 1:
            return acc, n
        correct, n = distributed.total([round(acc * n / 100) if n else 0, n])
        return (100.0 * correct / n if n else float("nan")), n
