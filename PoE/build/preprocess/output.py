"""The run's files: finished parts written by rank 0 only (every rank waits), the pool's parts kept in the
listing its manifest is built from, and a new library written without ever showing a mixed pool."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from PoE.build import distributed
from PoE.core.checkpoint import save_checkpoint, seal
from PoE.core.errors import PoEError
from PoE.core.pool_paths import PoolPaths

if TYPE_CHECKING:
    from PoE.build.preprocess.record import RunRecord


def say(text: str) -> None:
    """Print on rank 0 only (every process of a torchrun run would print the same line)."""
    if distributed.is_main():
        print(text)


class PoolFiles:
    """Writes the run's finished parts and, through ``record``, the pool's manifest."""

    def __init__(self, pool: PoolPaths, dataset: str, record: RunRecord, adding: bool) -> None:
        self.pool, self.dataset, self.record, self.adding = pool, dataset, record, adding
        self.listing = record.listing  # the pool's parts as its manifest lists them

    def save(self, path: Path, kind: str, meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        """Rank 0 writes a finished part (a pool part is then in the listing the manifest is built from); every
        rank waits for it, so all see the same files afterwards."""
        if distributed.is_main():
            payload = seal({**meta, "kind": kind, "dataset": self.dataset, "state_dict": state_dict})
            save_checkpoint(path, payload)
            if self.is_pool_part(path):
                self.listing.add(path, payload)
        distributed.barrier()

    def is_pool_part(self, path: Path) -> bool:
        """Whether ``path`` is one of the files the pool's manifest lists (its library, an expert)."""
        return path == self.pool.library or path.parent == self.pool.root / "experts"

    def adopt(self, path: Path, payload: dict[str, Any], stage: str) -> bool:
        """Whether a finished pool part read from ``path`` may be used: the manifest lists it as it is. Any
        other file (an interrupted run's, one copied in) is made again, and ``stage`` says so."""
        if self.listing.lists(path, payload):
            return True
        say(f"[{stage}] {path} is not the part {self.pool.manifest.name} lists: making it again")
        return False

    def replace_library(self, meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        """Write a new library without ever showing a mixed pool: the experts of any other library go first
        (the manifest without them, then their files), then the library file, then a manifest of what is left."""
        if self.adding:  # an add changes nothing of what the pool holds; its library was checked when it opened
            raise PoEError(
                f"--add_tasks would replace the library of {self.pool.root}; check --pretrained (the "
                "folder the pool was built with)"
            )
        if distributed.is_main():
            old = [t for t, e in self.listing.experts.items() if e.get("library_id") != meta["id"]]
            for task in old:
                self.listing.drop(self.pool.expert(task))
            self.record.write()
            for task in old:
                self.pool.expert(task).unlink(missing_ok=True)
                say(f"[library] removed {self.pool.expert(task)}: it belongs to the previous library")
        self.save(self.pool.library, "library", meta, state_dict)
        if distributed.is_main():
            self.record.write()
