"""The pool in memory plus what the HTTP layer needs: costs, test split, bounded caches, batcher; the pool is
swapped for a new version when its manifest changes (tasks added or removed in place)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from PoE.core.data import ImageSet
from PoE.core.datasets import DatasetConfig, load_split
from PoE.core.errors import PoEError
from PoE.core.evaluate import count_macs, count_params
from PoE.core.manifest import signature
from PoE.query.model import TaskModel
from PoE.query.pool import BANK_CACHE, Pool
from PoE.query.service.batching import Batcher, BatchStats, ExportGate
from PoE.query.service.engine import Engine, chosen
from PoE.query.service.images import decode_image
from PoE.query.service.limits import LRU, MAX_EXPORT_BYTES, ClientError, check_count, one_line

log = logging.getLogger("PoE.query.service")

MODEL_ID_DIGITS = 16  # hex digits of the content digest in a model id
DECODE_INLINE = 1  # requests with more images decode on a thread: a small PNG decodes faster than a thread hop


def index_digits(n_tasks: int) -> int:
    """Hex digits per task in a model id: two up to 256 tasks (the ids of earlier versions), more beyond, the
    same for every task of a pool so that an id splits back into its tasks."""
    return max(2, len(f"{max(n_tasks - 1, 0):x}"))


class Batching(Protocol):
    """What the service needs of a batcher: the hand-written one (``Batcher``) or Ray Serve's."""

    stats: BatchStats
    engine: Engine | None  # onnxruntime sessions of the served modules, or None: torch runs them

    async def submit(self, model: TaskModel, x: torch.Tensor, top: int) -> list[dict[str, Any]]: ...
    def alive(self) -> bool: ...
    def arrive(self, n: int) -> None: ...
    def close(self) -> None: ...


BUILT_MODELS = 32  # built models kept per worker; each holds a copy of its experts' weights (docs/service.md)


class View:
    """One opened pool and everything derived from it: model ids, per-part costs and the caches of built models,
    accuracies and exported files. The service swaps whole views (``Service.current``), so a request is answered
    from one version of the pool, and no cache outlives the pool it was filled from."""

    def __init__(self, pool: Pool) -> None:
        self.pool, self.cfg = pool, pool.cfg
        # a model id is a digest of the parts' content ids and the task list, followed by the tasks' indices:
        # any worker (or replica) of the same pool derives the same id and reads the tasks back from it
        self.part_ids = {t: pool.part_id(t) for t in pool.experts} | {"": pool.part_id()}
        self.task_index = {t: i for i, t in enumerate(self.cfg.tasks)}
        self.code_digits = index_digits(len(self.task_index))
        size = self.cfg.image_size
        with torch.no_grad():
            self.feature_shape = tuple(pool.library(torch.zeros(1, 3, size, size, device=pool.device)).shape[1:])
        self.library_cost = (count_macs(pool.library, (3, size, size), pool.device), count_params(pool.library))
        # an expert's counts when a query first needs them: counting runs a forward, which for every expert of a
        # pool of hundreds of tasks would hold up each start and each reload
        self.expert_cost: dict[str, tuple[int, int]] = {}
        # task list -> TaskModel; each holds its own bank (its experts' weights concatenated), hence the count
        self.built: LRU = LRU(BUILT_MODELS)
        self.accuracies: LRU = LRU(4096)  # model id -> (accuracy %, test images)
        self.exports: LRU = LRU(MAX_EXPORT_BYTES, weigh=len)  # model id.format -> file bytes (in memory: no disk)

    def caches(self) -> dict[str, dict[str, int]]:
        """Each cache's fill and the bound it never passes: what the worker's memory above the pool can grow by."""
        return {
            "models": {"entries": len(self.built), "bound_entries": self.built.size},
            "accuracies": {"entries": len(self.accuracies), "bound_entries": self.accuracies.size},
            "exports": {"entries": len(self.exports), "bytes": self.exports.weight, "bound_bytes": self.exports.size},
            "banks": {"entries": self.pool.cached_banks(), "bound_entries": BANK_CACHE},
        }

    def digest(self, tasks: list[str]) -> str:
        parts = "|".join(f"{t}:{self.part_ids[t]}" for t in tasks)
        return hashlib.sha256(f"{self.part_ids['']}|{parts}".encode()).hexdigest()[:MODEL_ID_DIGITS]

    def model_id(self, tasks: list[str]) -> str:
        """``<digest>-<task indices, code_digits hex digits each>``: the same on every worker of the same pool."""
        return f"{self.digest(tasks)}-{''.join(f'{self.task_index[t]:0{self.code_digits}x}' for t in tasks)}"

    def tasks_of(self, model_id: str) -> list[str] | None:
        """The tasks a model id names, or None unless the id is exactly what ``model_id`` gives for them (an id of
        a pool before an add or a remove names the same model, or none)."""
        codes, k = model_id.partition("-")[2], self.code_digits
        names = list(self.cfg.tasks)
        if len(codes) % k or len(codes) > k * len(names):
            return None
        try:
            tasks = [names[int(codes[i : i + k], 16)] for i in range(0, len(codes), k)]
        except (ValueError, IndexError):
            return None
        if not tasks or any(t not in self.part_ids for t in tasks) or len(set(tasks)) != len(tasks):
            return None
        return tasks if self.model_id(tasks) == model_id else None

    def build(self, tasks: list[str]) -> TaskModel:
        try:
            return self.pool.query(tasks)
        except PoEError as e:
            raise ClientError(400, str(e)) from None

    def model(self, tasks: list[str]) -> TaskModel:
        """``build``, remembered per task list for predictions. A build is cheap (``Pool.query`` checks the tasks and
        wraps the shared modules; docs/expert_bank.md has its time), but a prediction then skips even that on the
        event loop."""
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
            if t not in self.expert_cost:
                e = self.pool.experts[t]
                self.expert_cost[t] = (count_macs(e, self.feature_shape, self.pool.device), count_params(e))
            macs, params = macs + self.expert_cost[t][0], params + self.expert_cost[t][1]
        return macs, params

    def classes_of(self, model: TaskModel) -> list[dict[str, Any]]:
        return [{"id": c, "name": n} for c, n in zip(model.classes, model.class_names, strict=True)]


def worker_thread(name: str, threads: int) -> ThreadPoolExecutor:
    """One thread for slow work, running torch on ``threads`` threads of its own."""
    return ThreadPoolExecutor(1, name, initializer=torch.set_num_threads, initargs=(threads,))


class Service:
    """The current ``View`` of the pool plus what outlives a swap: the test split (read once), the batcher and
    the threads of slow work. ``watch``: follow the pool's manifest (tasks added or removed in place)."""

    def __init__(
        self,
        pool: Pool,
        data_root: str | Path | None = None,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        batching: Batching | None = None,
        watch: bool = True,
        engine: str = "torch",
    ) -> None:
        self.view, self.data_root, self.watch = View(pool), data_root, watch
        self.gate = ExportGate()
        threads = torch.get_num_threads()  # the worker's count (``Settings.app`` sets it before this)
        self.engine = chosen(engine, pool.device, pool.precision)  # onnx or torch (PoE.query.service.engine)
        self.batcher: Batching = batching or Batcher(self.gate, max_batch, max_wait_ms, threads, self.engine)
        self.lock = threading.Lock()
        # evaluations and exports run one at a time on their own thread: few threads touch torch, which keeps
        # the memory of per-thread allocator arenas and OpenMP teams bounded. Each sets its torch threads as it
        # starts (a thread otherwise takes whatever default the process has then: batching.threads_for)
        self.slow = worker_thread("poe-slow", threads)
        self.decode = worker_thread("poe-decode", 1)
        self.opener = worker_thread("poe-reload", threads)
        self.reloading: asyncio.Future | None = None
        self.refused: tuple | None = None  # the manifest's state when opening it last failed (not retried)
        self._test = None
        self.started = time.time()

    @property
    def pool(self) -> Pool:
        return self.view.pool

    @property
    def cfg(self) -> DatasetConfig:
        return self.view.cfg

    def close(self) -> None:
        self.batcher.close()
        self.slow.shutdown(wait=True, cancel_futures=True)
        self.decode.shutdown(wait=True, cancel_futures=True)
        self.opener.shutdown(wait=True, cancel_futures=True)

    async def run_slow(self, fn: Any, *args: Any) -> Any:
        return await asyncio.wrap_future(self.slow.submit(fn, *args))

    async def current(self) -> View:
        """The view to answer a request from. When the pool's manifest (or its ``hierarchy.json``) changed since
        the view's pool read it (a stat of two files per request), a new ``Pool`` is opened beside the old one, off
        the event loop, and swapped in only once it passed every check; a pool that fails them is logged and the
        old one kept (until the files change again). Requests arriving meanwhile wait for the new view, so every
        answer given after a command changed the pool is the changed pool's."""
        view = self.view
        if not self.watch:
            return view
        now = signature(view.pool.paths)
        if now in (view.pool.signature, self.refused):
            return view
        if self.reloading is None or self.reloading.done():
            self.reloading = asyncio.ensure_future(self.reload(view, now))
        await asyncio.shield(self.reloading)
        return self.view

    async def reload(self, old: View, now: tuple) -> None:
        def open_view() -> View:
            pool = Pool.open(  # a pinned pool stays that pool
                old.pool.root, old.cfg.name, expected_digest=old.pool.pinned, runtime=old.pool.runtime
            )
            with self.gate.export():  # counting the costs hooks every module of the process (torch's FlopCounterMode
                return View(pool)  # tracks modules with global hooks): no forward may run meanwhile

        try:
            self.view = await asyncio.wrap_future(self.opener.submit(open_view))
            self.refused = None
            log.info(
                "reloaded %s: %d tasks, %d experts",
                self.view.pool.root,
                len(self.view.cfg.tasks),
                len(self.view.pool.experts),
            )
        except Exception as e:  # any failure: keep serving the pool that passed its checks
            self.refused = now
            log.warning(
                "the pool changed, but the new version was not loaded (still serving the previous one): %s", one_line(e)
            )

    def test_split(self, classes: list[int]) -> ImageSet:
        """In-memory datasets are read once and shared; a streamed one decodes only ``classes``' images."""
        if self.data_root is None:
            raise ClientError(503, "this server was started without test data (data_root); accuracy is unavailable")
        if self.cfg.streamed:
            return load_split(self.cfg, self.data_root, "test", progress=False, classes=classes)
        with self.lock:
            if self._test is None:
                self._test = load_split(self.cfg, self.data_root, "test", progress=False)
            return self._test

    def accuracy(self, view: View, model: TaskModel, key: str) -> tuple[float, int]:
        """The CLI's accuracy (same function, same rounding), cached per model. Test data that cannot be used
        is the server's state, not the client's fault: 503; classes without test images: 422. Never a 500."""
        hit = view.accuracies.get(key)
        if hit is None:
            try:
                test = self.test_split(model.classes)
            except ClientError:
                raise
            except (PoEError, OSError, ValueError, IndexError, KeyError, MemoryError) as e:
                raise ClientError(503, f"accuracy is unavailable: the test data cannot be used: {e}") from None
            counts = torch.bincount(test.y.long().clamp(min=0), minlength=self.cfg.num_classes)
            missing = [f"{c} {model.class_names[i]}" for i, c in enumerate(model.classes) if counts[c] == 0]
            if missing:
                raise ClientError(
                    422,
                    f"the test split has no images of this query's class(es) {', '.join(missing)}; "
                    "no accuracy can be measured (query without evaluate)",
                )
            try:
                with self.gate.forward():
                    acc, n = model.accuracy(test)
            except PoEError as e:
                raise ClientError(422, str(e)) from None
            except (ValueError, IndexError, KeyError, RuntimeError, MemoryError) as e:
                why = f"{type(e).__name__}: {one_line(e)}"
                raise ClientError(503, f"accuracy is unavailable: the test data cannot be used ({why})") from None
            if n == 0 or not math.isfinite(acc):
                raise ClientError(
                    422,
                    "the test split has no images of this query's classes; no accuracy can be "
                    "measured (query without evaluate)",
                )
            hit = (round(acc, 2), n)
            view.accuracies.put(key, hit)
        return hit

    def export(self, view: View, key: str, tasks: list[str], fmt: str = "pt2") -> bytes:
        """The model's ``.pt2`` (``fmt`` "pt2") or ``.onnx`` (fp32) bytes, exported on first request (on the slow
        thread, so exports never overlap one another) and kept in memory: the service writes nothing to disk."""
        data = view.exports.get(f"{key}.{fmt}")
        if data is not None:
            return data
        model = view.pool.query(tasks)  # TaskModel.program traces a private copy of the shared modules
        buffer = io.BytesIO()
        try:
            with self.gate.export():
                if fmt == "onnx":
                    from PoE.query.onnx_export import onnx_bytes

                    buffer.write(onnx_bytes(model))
                else:
                    torch.export.save(model.program(), buffer)
        except OSError as e:  # torch may still use TMPDIR on the way: a full disk is the server's, not the client's
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ClientError(507, f"no space left to write the model ({one_line(e)}); retry later") from None
            raise ClientError(503, f"cannot write the model: {one_line(e)}") from None
        data = buffer.getvalue()
        view.exports.put(f"{key}.{fmt}", data)
        return data

    async def predict(
        self, model: TaskModel, images: list[bytes] | torch.Tensor, top: int, arrival: Any = None
    ) -> dict[str, Any]:
        """Decode image files (off the event loop for several images; pixels from ``pixels`` need none), then
        answer from a batched forward."""
        if top < 1:
            raise ClientError(400, f"top must be 1 or more (classes shown per image), got {top}")
        if isinstance(images, torch.Tensor):
            x = images
        elif len(images) > DECODE_INLINE:
            x = await asyncio.wrap_future(self.decode.submit(self.images, images))
        else:
            x = self.images(images)
        if arrival is not None:
            arrival.done()
        rows = await self.batcher.submit(model, x, top)
        classes = [{"id": c, "name": n} for c, n in zip(model.classes, model.class_names, strict=True)]
        return {"tasks": model.tasks, "classes": classes, "predictions": rows, "pool_digest": model.pool.digest}

    def images(self, images: list[bytes]) -> torch.Tensor:
        size = self.cfg.image_size
        return pixel_batch(np.stack([decode_image(b, i, size) for i, b in enumerate(images)]))

    def pixels(self, data: bytes) -> torch.Tensor:
        """Raw uint8 RGB pixels, N x S x S x 3 in that order (numpy's ``tobytes()`` of such an array), S the pool's
        image size: N follows from the length, which must be a whole number of images."""
        size = self.cfg.image_size
        per_image = size * size * 3
        if len(data) % per_image:
            raise ClientError(
                400,
                f"raw pixels of {len(data):,} bytes are not a whole number of images; this pool takes "
                f"N x {size} x {size} x 3 uint8 RGB pixels, {per_image:,} bytes per image",
            )
        check_count(len(data) // per_image)
        return pixel_batch(np.frombuffer(data, np.uint8).reshape(-1, size, size, 3).copy())


def pixel_batch(images: np.ndarray) -> torch.Tensor:
    """uint8 N x S x S x 3 (``decode_image``'s RGB, of the pool's size) as the uint8 N x 3 x S x S tensor the batcher
    takes (channels-last in memory, as the served modules run): the batcher scales and standardises every request's
    pixels in one operation (``batching.forward``), not the event loop each request's."""
    return torch.from_numpy(images).permute(0, 3, 1, 2)
