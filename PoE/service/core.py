"""The pool in memory plus what the HTTP layer needs: costs, test split, bounded caches, batcher."""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from PoE.data import ImageSet, image_batch
from PoE.datasets import load_split
from PoE.errors import PoEError
from PoE.evaluate import count_macs, count_params
from PoE.pool import Pool, TaskModel
from PoE.service.batching import Arrival, Batcher, ExportGate
from PoE.service.images import decode_image
from PoE.service.limits import LRU, ClientError
from PoE.store import state_id


class Service:
    """The pool in memory plus what the HTTP layer needs: per-part costs, the test split (read once),
    bounded caches of accuracies and exported models, and the batcher."""

    def __init__(self, pool: Pool, data_root: str | Path | None = None, max_batch: int = 64,
                 max_wait_ms: float = 5.0) -> None:  # fmt: skip
        self.pool, self.cfg, self.data_root = pool, pool.cfg, data_root
        self.pool_id = pool.id or state_id(pool.library)  # bare original-release files carry no id
        size = self.cfg.image_size
        with torch.no_grad():
            feature_shape = tuple(pool.library(torch.zeros(1, 3, size, size, device=pool.device)).shape[1:])
        self.library_cost = (count_macs(pool.library, (3, size, size), pool.device), count_params(pool.library))
        self.expert_cost = {t: (count_macs(e, feature_shape, pool.device), count_params(e))
                            for t, e in pool.experts.items()}  # fmt: skip
        self.gate = ExportGate()
        self.batcher = Batcher(pool, self.gate, max_batch, max_wait_ms)
        self.models: LRU = LRU(4096)  # model id -> task list, for /api/models/<id>.pt2 (the last 4096 queries)
        self.built: LRU = LRU(256)  # task list -> TaskModel (shares the pool's modules: a few objects each)
        self.accuracies: LRU = LRU(4096)  # model id -> (accuracy %, test images)
        self.export_dir = tempfile.TemporaryDirectory(prefix="poe-models-")  # removed when the app is
        self.exports: LRU = LRU(32, drop=lambda p: Path(p).unlink(missing_ok=True))  # garbage-collected
        self.lock = threading.Lock()
        # evaluations and exports run one at a time on their own thread: few threads touch torch, which keeps
        # the memory of per-thread allocator arenas and OpenMP teams bounded
        self.slow = ThreadPoolExecutor(max_workers=1, thread_name_prefix="poe-slow")
        self._test = None
        self.started = time.time()

    def close(self) -> None:
        self.batcher.close()
        self.slow.shutdown(wait=True, cancel_futures=True)
        self.export_dir.cleanup()

    async def run_slow(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self.slow.submit(fn, *args))

    def model_id(self, tasks: list[str]) -> str:
        return hashlib.sha256(f"{self.pool_id}|{','.join(tasks)}".encode()).hexdigest()[:16]

    def build(self, tasks: list[str]) -> TaskModel:
        try:
            return self.pool.query(tasks)
        except PoEError as e:
            raise ClientError(400, str(e)) from None

    def model(self, tasks: list[str]) -> TaskModel:
        """``build``, remembered per task list for predictions. A build is cheap (about 0.05 ms for three tasks on
        the shipped pool: ``Pool.query`` checks the tasks and wraps the shared modules, it sets no eval mode), but
        a prediction then skips even that on the event loop."""
        key = tuple(tasks)
        model = self.built.get(key)
        if model is None:
            model = self.build(tasks)
            self.built.put(key, model)
        return model

    def cost(self, model: TaskModel) -> tuple[int, int]:
        """(multiply-adds, parameters): ``TaskModel.cost()``'s numbers, from the per-part counts."""
        macs, params = self.library_cost
        for t in model.tasks:
            macs, params = macs + self.expert_cost[t][0], params + self.expert_cost[t][1]
        return macs, params

    def test_split(self, classes: list[int]) -> ImageSet:
        """In-memory datasets are read once and shared; a streamed one decodes only ``classes``' images."""
        if self.data_root is None:
            raise ClientError(503, "this server was started without test data (data_root); accuracy is unavailable")
        if self.cfg.streamed:
            return load_split(self.cfg.name, self.data_root, "test", progress=False, classes=classes)
        with self.lock:
            if self._test is None:
                self._test = load_split(self.cfg.name, self.data_root, "test", progress=False)
            return self._test

    def accuracy(self, model: TaskModel, key: str) -> tuple[float, int]:
        """The CLI's accuracy (same function, same rounding), cached per model."""
        hit = self.accuracies.get(key)
        if hit is None:
            try:
                test = self.test_split(model.classes)
            except PoEError as e:
                raise ClientError(503, f"accuracy is unavailable: {e}") from None
            with self.gate.forward():
                acc, n = model.accuracy(test)
            hit = (round(acc, 2), n)
            self.accuracies.put(key, hit)
        return hit

    def export(self, key: str, tasks: list[str]) -> Path:
        """The model's ``.pt2`` in the app's own temporary folder, written on first request (on the slow
        thread, so exports never overlap one another)."""
        path = self.exports.get(key)
        if path is not None and Path(path).exists():
            return Path(path)
        model = self.pool.query(tasks)  # TaskModel.export traces a private copy of the shared modules
        target = Path(self.export_dir.name) / f"{key}.pt2"
        with self.gate.export():
            model.export(target)
        self.exports.put(key, str(target))
        return target

    def classes_of(self, model: TaskModel) -> list[dict[str, Any]]:
        return [{"id": c, "name": n} for c, n in zip(model.classes, model.class_names, strict=True)]

    async def predict(self, model: TaskModel, images: list[bytes], top: int, arrival: Arrival | None = None
                      ) -> dict[str, Any]:  # fmt: skip
        if top < 1:
            raise ClientError(400, f"top must be 1 or more (classes shown per image), got {top}")
        size = self.cfg.image_size
        try:
            x = image_batch([decode_image(b, i, size) for i, b in enumerate(images)], size)
        except PoEError as e:
            raise ClientError(400, str(e)) from None
        self.models.put(self.model_id(model.tasks), model.tasks)
        if arrival is not None:
            arrival.done()
        pred = await self.batcher.submit(model, x)
        return {
            "tasks": model.tasks,
            "classes": self.classes_of(model),
            "predictions": [
                {"class_id": c, "class_name": n, "top": pred.top(i, top)}
                for i, (c, n) in enumerate(zip(pred.class_ids, pred.class_names, strict=True))
            ],
        }
