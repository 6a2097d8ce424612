"""The pool as an HTTP service: FastAPI app (JSON API, OpenAPI docs, web page) over one in-memory ``Pool``.

Why the pieces are here and not in ``PoE.pool``:

- Dynamic batching. Every query shares the pool's library, which is nearly all of a composite model's
  cost, so one worker thread runs the library once on the images of every request waiting, then each
  queried expert once on the rows of the requests that asked for it, and merges each request's experts by
  the consolidated model's own rule (``PoE.consolidate.merge``). It waits (a few ms at most) only while
  other prediction requests are still being received, so a lone request is never delayed. The event loop
  never runs a forward; it only awaits futures.
- The cost of a query is the library's plus its experts' (the consolidated model shares those modules and
  adds no layer), so it is counted once per part at start-up rather than traced per request, which keeps
  ``/api/query`` within milliseconds for any of the 2^20 task sets.
- ``torch.export`` must not run beside anything else in the process (it pushes process-global tracing
  state), so exports wait for the running forwards and hold new ones back (``ExportGate``).
- Everything a request can trigger is bounded: body size, image count, the model registry, the caches
  of built models, accuracies and exported files.

Every user error is a 4xx with ``{"error": "<one line>"}``; nothing a client sends can produce a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import logging
import os
import queue
import re
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from starlette.exceptions import HTTPException

from PoE.consolidate import merge
from PoE.data import ImageSet, image_batch
from PoE.datasets import load_split
from PoE.errors import PoEError
from PoE.evaluate import count_macs, count_params
from PoE.pool import Pool, Prediction, TaskModel
from PoE.precision import autocast
from PoE.store import state_id

log = logging.getLogger("PoE.server")

WEB = Path(__file__).resolve().parent / "web"
MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 256
DEFAULT_TOP = 5
MODEL_ID = re.compile(r"[0-9a-f]{16}\.pt2")
IMAGE_FORMATS = ("PNG", "JPEG")


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class ClientError(HTTPException):
    """A 4xx answered as ``{"error": detail}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status_code=status, detail=one_line(message))


# ---------------------------------------------------------------------------- request bodies
class QueryBody(BaseModel):
    """``POST /api/query``: strict types, so that ``"tasks": "people"`` is refused rather than split into letters."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[StrictStr] = Field(examples=[["people", "vehicles_1"]])
    evaluate: StrictBool = False


class PredictBody(BaseModel):
    """``POST /api/predict``: images as base64 PNG or JPEG (a ``data:`` URL prefix is accepted)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[StrictStr] = Field(examples=[["people", "vehicles_1"]])
    images: list[StrictStr]
    top: StrictInt = DEFAULT_TOP


USAGE = {
    "/api/query": 'send JSON {"tasks": [TASK, ...], "evaluate": false}',
    "/api/predict": 'send JSON {"tasks": [TASK, ...], "images": [BASE64_PNG_OR_JPEG, ...], "top": 5}',
    "/api/predict/upload": "send multipart/form-data with one or more 'tasks' fields, one or more 'images' files "
    "(PNG or JPEG) and optionally 'top'",
}


# ---------------------------------------------------------------------------- images
def decode_image(data: bytes, index: int, size: int) -> np.ndarray:
    """One PNG or JPEG as uint8 H x W x 3 (``PoE.data.image_batch`` then checks it as the Python API does).
    The size is checked from the header, before the pixels are decoded, so a small file cannot expand into
    a huge image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in IMAGE_FORMATS:
                raise ClientError(400, f"image {index} is {im.format}; accepted: PNG or JPEG")
            if im.size != (size, size):
                raise ClientError(
                    400, f"image {index} is {im.size[0]}x{im.size[1]}; this pool takes {size}x{size} RGB images "
                    "(resize first; the web page does)",
                )  # fmt: skip
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy warns on read-only arrays
    except UnidentifiedImageError:
        raise ClientError(400, f"image {index} is not an image; accepted: PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = one_line(e)
        raise ClientError(400, f"image {index} is corrupt or truncated ({why}); accepted: PNG or JPEG") from None


def decode_base64(text: str, index: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, f"image {index} is not valid base64; send base64-encoded PNG or JPEG bytes") from None


# ---------------------------------------------------------------------------- dynamic batching
@dataclass
class Job:
    """One request's images (float RGB in [0, 1], N x 3 x S x S) for one consolidated model."""

    model: TaskModel
    x: torch.Tensor
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


@dataclass
class BatchStats:
    forwards: int = 0  # library forwards (one per batch)
    requests: int = 0
    images: int = 0
    largest_batch_requests: int = 0
    largest_batch_images: int = 0
    last_batch_requests: list[int] = field(default_factory=list)  # requests per batch, last 64 batches

    def add(self, requests: int, images: int) -> None:
        self.forwards += 1
        self.requests += requests
        self.images += images
        self.largest_batch_requests = max(self.largest_batch_requests, requests)
        self.largest_batch_images = max(self.largest_batch_images, images)
        self.last_batch_requests = [*self.last_batch_requests[-63:], requests]

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["mean_requests_per_forward"] = round(self.requests / self.forwards, 3) if self.forwards else 0.0
        return d


class Batcher:
    """One worker thread runs every forward: it takes the first waiting job and every job already queued,
    waits (at most ``max_wait_ms``, up to ``max_batch`` images) only while other prediction requests are still
    arriving (being received or decoded), and answers all of them from one library forward. So a lone
    request never waits, and concurrent ones share a forward."""

    def __init__(self, pool: Pool, gate: ExportGate, max_batch: int = 64, max_wait_ms: float = 5.0) -> None:
        self.pool, self.gate, self.max_batch, self.max_wait = pool, gate, max_batch, max_wait_ms / 1e3
        cfg = pool.cfg
        self.mean = torch.tensor(cfg.mean, device=pool.device).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.std, device=pool.device).view(1, -1, 1, 1)
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.arriving = 0  # prediction requests received but not yet submitted (see Arrivals)
        self.arriving_lock = threading.Lock()
        self.stats = BatchStats()
        self.thread = threading.Thread(target=self.run, name="poe-batcher", daemon=True)
        self.thread.start()

    async def submit(self, model: TaskModel, x: torch.Tensor) -> Prediction:
        loop = asyncio.get_running_loop()
        job = Job(model, x, loop, loop.create_future())
        self.jobs.put(job)
        return await job.future

    def arrive(self, n: int) -> None:
        with self.arriving_lock:
            self.arriving += n

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def collect(self, first: Job) -> list[Job]:
        batch, rows = [first], len(first.x)
        deadline = time.perf_counter() + self.max_wait
        while rows < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                if self.arriving <= 0 or time.perf_counter() >= deadline:
                    break
                try:
                    job = self.jobs.get(timeout=min(deadline - time.perf_counter(), 0.0005))
                except (queue.Empty, ValueError):  # ValueError: the deadline passed meanwhile
                    continue
            if job is None:  # closing: answer what was collected, then stop
                self.jobs.put(None)
                break
            batch.append(job)
            rows += len(job.x)
        return batch

    def run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = self.collect(first)
            try:
                with self.gate.forward():
                    results: list[Any] = self.forward(batch)
            except Exception as e:  # answer every waiting request; the worker keeps serving
                log.exception("batch forward failed")
                results = [RuntimeError(f"prediction failed: {one_line(e)}")] * len(batch)
            for job, result in zip(batch, results, strict=True):
                job.loop.call_soon_threadsafe(settle, job.future, result)

    @torch.no_grad()
    def forward(self, batch: list[Job]) -> list[Prediction]:
        """The library once on every row, each expert once on the rows of the requests that queried it."""
        pool = self.pool
        x = torch.cat([j.x for j in batch]).to(pool.device)
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        rows: dict[str, list[torch.Tensor]] = {}  # per expert: the row indices it runs on, in job order
        taken: dict[str, int] = {}  # per expert: rows so far
        offset: list[dict[str, int]] = []  # per job: where its rows start in each of its experts' outputs
        start = 0
        for job in batch:
            n = len(job.x)
            offset.append({})
            for task in job.model.tasks:
                offset[-1][task] = taken.get(task, 0)
                taken[task] = offset[-1][task] + n
                rows.setdefault(task, []).append(torch.arange(start, start + n, device=pool.device))
            start += n
        with autocast(pool.device, pool.precision):
            features = pool.library(x)
            out = {}
            for task, idx in rows.items():
                sel = torch.cat(idx)
                out[task] = pool.experts[task](features if len(sel) == len(x) else features.index_select(0, sel))
        self.stats.add(len(batch), len(x))
        preds = []
        for job, where in zip(batch, offset, strict=True):
            n = len(job.x)
            logits = merge([out[t][where[t] : where[t] + n] for t in job.model.tasks], job.model.module.order)
            preds.append(job.model.prediction(logits))
        return preds


def settle(future: asyncio.Future, result: Any) -> None:
    if future.done():  # the client went away
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class ExportGate:
    """Forwards may overlap one another; ``torch.export`` may not overlap anything (it pushes process-global
    tracing state; two exports at once fail with "Trying to pop empty mode stack"), so it waits for the
    running forwards, holds new ones back, and runs alone."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.running, self.exporting, self.waiting = 0, False, 0

    @contextmanager
    def forward(self) -> Iterator[None]:
        with self.cond:
            self.cond.wait_for(lambda: not self.exporting and not self.waiting)
            self.running += 1
        try:
            yield
        finally:
            with self.cond:
                self.running -= 1
                self.cond.notify_all()

    @contextmanager
    def export(self) -> Iterator[None]:
        with self.cond:
            self.waiting += 1
            self.cond.wait_for(lambda: not self.exporting and not self.running)
            self.waiting -= 1
            self.exporting = True
        try:
            yield
        finally:
            with self.cond:
                self.exporting = False
                self.cond.notify_all()


# ---------------------------------------------------------------------------- the service
class LRU:
    """A thread-safe map that forgets its least recently used entries beyond ``size`` (``drop`` gets each)."""

    def __init__(self, size: int, drop: Any = None) -> None:
        self.size, self.drop = size, drop
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def get(self, key: Any) -> Any:
        with self.lock:
            if key not in self.items:
                return None
            self.items.move_to_end(key)
            return self.items[key]

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            dropped = [self.items.popitem(last=False)[1] for _ in range(len(self.items) - self.size)]
        for old in dropped:
            if self.drop:
                self.drop(old)


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
        """``build``, remembered per task list for predictions: a build costs ~0.2-1 ms of the event loop
        (``Pool.query`` sets eval mode on every library module), more than the rest of a request's handling."""
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
            return load_split(self.cfg, self.data_root, "test", progress=False, classes=classes)
        with self.lock:
            if self._test is None:
                self._test = load_split(self.cfg, self.data_root, "test", progress=False)
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


def check_count(n: int) -> None:
    if n == 0:
        raise ClientError(400, "no images given; send one or more PNG or JPEG images")
    if n > MAX_IMAGES:
        raise ClientError(413, f"{n} images in one request; at most {MAX_IMAGES}")


def rss_bytes() -> int | None:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class Arrival:
    """One prediction request counted as arriving until it submits its images or ends (whichever first)."""

    def __init__(self, batcher: Batcher) -> None:
        self.batcher, self.open = batcher, True
        batcher.arrive(1)

    def done(self) -> None:
        if self.open:
            self.open = False
            self.batcher.arrive(-1)


class Arrivals:
    """ASGI middleware: counts prediction requests from their first byte, so the batcher knows that more
    images are on their way while bodies are still being received, parsed and decoded."""

    def __init__(self, app: Any, batcher: Batcher) -> None:
        self.app, self.batcher = app, batcher

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/api/predict"):
            return await self.app(scope, receive, send)
        arrival = scope["poe.arrival"] = Arrival(self.batcher)
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.done()


# ---------------------------------------------------------------------------- body size limit
class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is answered 413, whether announced by Content-Length or
    streamed (the error is raised from ``receive``, which FastAPI passes through as an HTTP error)."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = JSONResponse({"error": self.message(f"of {int(length):,} bytes")}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise ClientError(413, self.message(f"(more than {seen:,} bytes received)"))
            return message

        await self.app(scope, limited, send)

    def message(self, size: str) -> str:
        return f"request body {size} is over the limit of {self.limit:,} bytes ({self.limit / 2**20:g} MB)"


# ---------------------------------------------------------------------------- the app
def create_app(pool: Pool, data_root: str | Path | None = None, *, max_batch: int = 64,
               max_wait_ms: float = 5.0) -> FastAPI:  # fmt: skip
    """The FastAPI app over ``pool`` (already opened and checked). ``data_root``: where the test split is,
    for ``evaluate``; None disables accuracy. ``max_batch`` images / ``max_wait_ms``: the batching window."""
    service = Service(pool, data_root, max_batch, max_wait_ms)
    tasks_known = ", ".join(pool.cfg.tasks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()

    app = FastAPIOffline(  # FastAPI whose /docs and /redoc serve their scripts from the package: no CDN needed
        title="Pool of Experts",
        description="Query a pool of experts in real time: pick primitive tasks, get a consolidated model "
        "(its accuracy, size, cost and a torch.export download) and predictions, without training.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    app.add_middleware(Arrivals, batcher=service.batcher)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc, ClientError) else one_line(exc.detail)
        if exc.status_code == 404 and not isinstance(exc, ClientError):
            message = f"not found: {request.url.path}; the API is under /api (see /docs), the web page at /"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}; see /docs"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            why = first.get("ctx", {}).get("error", "cannot parse")
            what = f"malformed JSON ({why} at character {first['loc'][-1]})"
        else:
            loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
            what = f"bad request: {loc}: {first.get('msg', 'invalid')}"
        usage = USAGE.get(request.url.path, "see /docs")
        return JSONResponse({"error": one_line(f"{what}; {usage}; known tasks: {tasks_known}")}, status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request %s failed", request.url.path)
        return JSONResponse({"error": one_line(f"internal error: {exc}")}, status_code=500)

    @app.get("/healthz", summary="Liveness: the pool is loaded and the batcher runs")
    async def healthz() -> dict[str, Any]:
        alive = service.batcher.thread.is_alive()
        if not alive:
            raise ClientError(503, "the prediction worker has stopped")
        return {"status": "ok", "dataset": pool.cfg.name, "experts": len(pool.experts)}

    @app.get("/api/pool", summary="The pool: dataset and, per task, its classes, its expert's presence and accuracy")
    async def pool_info() -> dict[str, Any]:
        info = pool.describe()
        info.update(image_size=pool.cfg.image_size, precision=pool.precision, max_images=MAX_IMAGES,
                    max_body_bytes=MAX_BODY_BYTES, accuracy_available=data_root is not None)  # fmt: skip
        return info

    @app.post("/api/query", summary="Consolidate a model for a set of tasks: classes, FLOPs, params, build time, "
              "accuracy (evaluate: true) and a download URL")  # fmt: skip
    async def query(body: QueryBody) -> JSONResponse:
        model = service.build(body.tasks)
        key = service.model_id(model.tasks)
        service.models.put(key, model.tasks)
        macs, params = service.cost(model)
        out: dict[str, Any] = {
            "tasks": model.tasks,
            "classes": service.classes_of(model),
            "flops": macs,
            "params": params,
            "build_ms": round(model.build_ms, 3),
            "model": f"/api/models/{key}.pt2",
            "precision": pool.precision,
        }
        if body.evaluate:
            out["accuracy"], out["n_test"] = await service.run_slow(service.accuracy, model, key)
        return JSONResponse(out)

    @app.post("/api/predict", summary="Top classes of base64 PNG/JPEG images under the queried tasks' model")
    async def predict(body: PredictBody, request: Request) -> JSONResponse:
        model = service.model(body.tasks)  # task errors first
        check_count(len(body.images))
        images = [decode_base64(s, i) for i, s in enumerate(body.images)]
        return JSONResponse(await service.predict(model, images, body.top, request.scope.get("poe.arrival")))

    @app.post("/api/predict/upload", summary="As /api/predict, from a multipart form (tasks fields, image files)")
    async def predict_upload(
        request: Request,
        tasks: Annotated[list[str], Form(description="task names: repeat the field, or separate with commas")],
        images: Annotated[list[UploadFile], File(description="PNG or JPEG files")],
        top: Annotated[int, Form()] = DEFAULT_TOP,
    ) -> JSONResponse:
        names = [t for field_value in tasks for t in re.split(r"[,\s]+", field_value) if t]
        model = service.model(names)
        check_count(len(images))
        data = [await f.read() for f in images]
        return JSONResponse(await service.predict(model, data, top, request.scope.get("poe.arrival")))

    @app.get("/api/models/{name}", summary="Download a queried model as a torch.export program (.pt2)",
             response_class=FileResponse)  # fmt: skip
    async def download(name: str) -> FileResponse:
        key = name.removesuffix(".pt2")
        tasks = service.models.get(key) if MODEL_ID.fullmatch(name) else None
        if tasks is None:
            raise ClientError(404, f"unknown model {name[:80]!r}; POST /api/query gives a model URL")
        path = await service.run_slow(service.export, key, tasks)
        return FileResponse(path, media_type="application/octet-stream", filename=f"poe_{'__'.join(tasks)[:120]}.pt2")

    @app.get("/api/stats", summary="Batching statistics and the server's memory")
    async def stats() -> dict[str, Any]:
        return {**service.batcher.stats.as_dict(), "rss_bytes": rss_bytes(),
                "uptime_s": round(time.time() - service.started, 1), "models_known": len(service.models),
                "models_exported": len(service.exports), "accuracies_cached": len(service.accuracies)}  # fmt: skip

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB / "index.html", media_type="text/html")

    app.mount("/web", StaticFiles(directory=WEB), name="web")
    return app


# ---------------------------------------------------------------------------- serve
def listen(host: str, port: int) -> socket.socket:
    """Bind before uvicorn does, so that a port in use is a one-line error (uvicorn logs and exits 1)."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and without
        # it a keep-alive client waits ~40 ms per request (Nagle's algorithm against delayed ACKs)
        sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except (OSError, OverflowError) as e:
        why = getattr(e, "strerror", None) or e
        hint = "; pick another --port (or stop what uses it)" if getattr(e, "errno", None) == 98 else ""
        raise PoEError(f"cannot listen on {host}:{port}: {one_line(why)}{hint}") from None
    sock.set_inheritable(True)
    return sock


def serve(pool: Pool, host: str = "127.0.0.1", port: int = 8000, data_root: str | Path | None = None, *,
          max_batch: int = 64, max_wait_ms: float = 5.0, threads: int | None = None) -> int:  # fmt: skip
    """Serve ``pool`` until interrupted; returns the exit code. Prints one line with the URL (port 0: a free
    port, the line says which). ``threads``: torch's intra-op threads (default: one less than the CPUs)."""
    import uvicorn

    sock = listen(host, port)
    if threads is None:  # leave a core to the event loop (HTTP, JSON, image decoding): on 2 CPUs, one torch
        # thread answered a lone /api/predict in 2.8 ms (p50), two in 4.5 ms, and 16 clients got more done too
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cpus - 1)
    torch.set_num_threads(threads)
    app = create_app(pool, data_root, max_batch=max_batch, max_wait_ms=max_wait_ms)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {pool.root} ({len(pool.experts)} experts) at http://{shown}:{bound}/ (API docs: /docs); "
          "Ctrl-C stops", flush=True)  # fmt: skip
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C / SIGINT, then re-raises it: a normal stop
        pass
    print("server stopped", flush=True)
    return 0
