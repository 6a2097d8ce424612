"""The Oracle's logits for the training batches of the later stages, cached per augmented view."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from PoE.build import distributed
from PoE.build.profiles import StageConfig
from PoE.core.checkpoint import load_checkpoint, save_checkpoint
from PoE.core.errors import PoEError
from PoE.core.loaders import Batch, TensorLoader
from PoE.core.runtime import Runtime


class TeacherOutputs:
    """The Oracle's logits for training batches, cached per augmented view when ``views`` > 0.

    Epoch ``e`` of a later stage uses view ``e % views``; each view's logits (fp16, N x classes) are
    computed once in eval mode, saved under ``cache_dir`` and reused by every stage and expert. The
    tables stay on the device that holds the training images, so a lookup is one gather there.
    With ``views`` = 0 the Oracle runs on every batch instead (a fresh augmentation every epoch).
    """

    def __init__(
        self,
        oracle: nn.Module,
        oracle_id: str,
        views: int,
        view_seed: int,
        cache_dir: Path,
        runtime: Runtime,
        progress: bool = True,
    ) -> None:
        self.oracle, self.oracle_id, self.views, self.view_seed = oracle.eval(), oracle_id, views, view_seed
        self.cache_dir, self.progress, self.runtime = cache_dir, progress, runtime
        self.tables: dict[int, torch.Tensor] = {}
        self.seconds = 0.0

    def batches(self, loader: TensorLoader, stage: StageConfig) -> Callable[[int], Iterator[Batch]]:
        """Epoch -> batches of ``loader``, drawn from the views whose logits this object serves. The views the
        stage will use are made ready first, so no epoch stops to run the Oracle (and epoch times are
        training alone)."""
        assert loader.view_seed == self.view_seed
        for view in range(min(self.views, stage.epochs)):
            self.table(view, loader)
        return lambda epoch: loader.epoch(epoch, epoch % self.views if self.views else epoch)

    def table(self, view: int, loader: TensorLoader) -> torch.Tensor:
        """One view's logits, on the device that holds ``loader``'s images."""
        if view not in self.tables:
            self.tables[view] = self.load_view(view, loader).to(loader.data.x.device)
        return self.tables[view]

    @torch.no_grad()
    def logits(self, batch: Batch, loader: TensorLoader) -> torch.Tensor:
        if not self.views:
            return self.oracle(batch.x).float()
        return self.table(batch.view, loader)[batch.index].float()

    @torch.no_grad()
    def load_view(self, view: int, loader: TensorLoader) -> torch.Tensor:
        """One view's table: rank 0 reads it from the cache or computes and writes it; the other ranks
        wait for that and read the file (every rank calls this at the same batches, all views alike)."""
        n = len(loader.data)
        path = (
            self.cache_dir
            / f"teacher_{self.oracle_id}_seed{self.view_seed}_n{n}_{self.runtime.precision}_view{view:04d}.pt"
        )
        table = None
        if distributed.is_main():
            table = self.cached(path, n)
            if table is None:
                table = self.compute(view, loader)
                save_checkpoint(path, {"logits": table.cpu()})
        distributed.barrier()
        if table is None:
            table = self.cached(path, n)
            if table is None:
                raise PoEError(f"{path}: teacher logits missing or unreadable after rank 0 wrote them")
        return table

    @staticmethod
    def cached(path: Path, n: int) -> torch.Tensor | None:
        if path.exists():
            table = load_checkpoint(path).get("logits")
            if isinstance(table, torch.Tensor) and table.shape[0] == n:
                return table
        return None

    @torch.no_grad()
    def compute(self, view: int, loader: TensorLoader) -> torch.Tensor:
        """One view's logits (fp16). Not ``evaluate.batched_logits``: its inputs are the loader's augmented,
        already normalised batches of one view (the same ones training sees), not a stored image tensor."""
        t0 = time.perf_counter()
        parts = []
        steps = -(-len(loader.data) // 500)
        batches = loader.ordered(view, 500)
        with torch.autocast(loader.device.type, enabled=False):  # called from inside a training step's autocast
            for batch in tqdm(
                batches, total=steps, desc=f"teacher view {view}", leave=False, disable=not self.progress
            ):
                with self.runtime.autocast():
                    logits = self.oracle(batch.x)
                parts.append(logits.half())
            table = torch.cat(parts)
        if table.is_cuda:
            torch.cuda.synchronize(table.device)
        self.seconds += time.perf_counter() - t0
        return table
