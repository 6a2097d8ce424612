"""The run's images: the training and test sets (read once, limited by ``--train_limit`` / ``--test_limit``),
the classes of its tasks and each stage's loader."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from PoE.build import distributed
from PoE.core.data import ImageSet, Normalizer
from PoE.core.errors import PoEError
from PoE.core.loaders import Draw, FolderLoader, TensorLoader, default_workers

if TYPE_CHECKING:
    from PoE.build.preprocess.settings import Execution, Plan, Training
    from PoE.build.profiles import StageConfig


def subset_index(n: int, keep: int | None, seed: int) -> torch.Tensor | None:
    """The seeded random subset (ascending indices) of ``keep`` of ``n`` images; None (all of them) without a limit.
    ``--train_limit`` draws it with the run's seed, ``--test_limit`` with the seed + 1."""
    if not keep or keep >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


class RunData:
    """One dataset's images as the run uses them: read on first use (rank 0 first under torchrun)."""

    def __init__(self, plan: Plan, data_root: Path, training: Training, execution: Execution) -> None:
        self.cfg, self.tasks, self.data_root = plan.cfg, plan.tasks, data_root
        self.training, self.execution = training, execution
        self.normalize = Normalizer(self.cfg.mean, self.cfg.std, execution.device)
        self._train: ImageSet | None = None
        self._test: ImageSet | None = None
        self.train_file: Path | None = None  # the npz the training images came from (its checksum is recorded)

    @property
    def train_set(self) -> ImageSet:
        if self._train is None:
            data, self.train_file = self.read_split("train")
            keep = self.limit(len(data), self.training.train_limit)
            self._train = data if keep is None else data.subset(keep)
        return self._train

    @property
    def test_set(self) -> ImageSet:
        if self._test is None:
            test = self.read_split("test")[0]
            keep = self.limit(len(test), self.training.test_limit, salt=1)
            self._test = test if keep is None else test.subset(keep)
        return self._test

    @property
    def task_classes(self) -> list[int]:
        """The classes of this run's tasks: all a streamed dataset's experts train and are tested on."""
        return sorted({c for t in self.tasks for c in self.cfg.tasks[t]})

    def check_test_limit(self) -> None:
        """Refuse, before any training or file, a ``--test_limit`` that keeps no test image of some task's classes
        (its expert's accuracy would be over none)."""
        test_limit = self.training.test_limit
        if not test_limit:
            return
        labels = set(self.test_set.y.tolist())
        for task in self.tasks:
            if not labels & set(self.cfg.tasks[task]):
                raise PoEError(
                    f"--test_limit {test_limit} keeps no test image of classes "
                    f"{list(self.cfg.tasks[task])} (task {task!r}): raise it"
                )

    def limit(self, n: int, keep: int | None, salt: int = 0) -> torch.Tensor | None:
        """What ``--train_limit`` (salt 0) or ``--test_limit`` (salt 1) keeps of ``n`` images (``subset_index``); a
        limit not below ``n`` keeps all, and says so (the table's image counts would otherwise be the only sign)."""
        if keep and keep >= n and distributed.is_main():
            split = ("train", "test")[salt]
            print(f"note: --{split}_limit {keep} is not below the {n} {split} images this run reads: all are used")
        return subset_index(n, keep, self.training.seed + salt)

    def read_split(self, split: str) -> tuple[ImageSet, Path]:
        """Rank 0 reads first (decoding an image folder into the cache once); the other ranks then read the cache."""
        classes = self.task_classes if self.cfg.streamed else None
        if distributed.is_main():
            out = self.cfg.source.read(self.data_root, split, self.execution.progress, classes)
        distributed.barrier()
        if not distributed.is_main():
            out = self.cfg.source.read(self.data_root, split, False, classes)
        return out

    def loader(self, stage: str, conf: StageConfig) -> TensorLoader | FolderLoader:
        """Batch order seeded per stage; augmented views seeded per run, so cached teacher views match.
        A streamed dataset (ImageNet) is decoded per batch, and only its images of this run's tasks are used."""
        seed, device = self.training.stage_seed(stage), self.execution.device
        draw = Draw(seed, self.training.seed, distributed.rank(), distributed.world())
        if self.cfg.source.train_files is not None:
            files, labels = self.cfg.source.train_files(self.data_root, self.task_classes)
            keep = self.limit(len(files), self.training.train_limit)
            if keep is not None:
                files, labels = [files[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]
            workers = default_workers() if self.execution.workers is None else self.execution.workers
            return FolderLoader(
                files, labels, conf.batch_size, self.normalize, self.cfg.image_size, device, draw, workers
            )
        return TensorLoader(self.train_set, conf.batch_size, self.normalize, self.cfg.crop_pad, device, draw)
