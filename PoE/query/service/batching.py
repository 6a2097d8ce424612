"""Dynamic batching: one worker thread answers every waiting prediction request from one library forward.

Every query shares the pool's library, which is most of a composite model's cost, so the worker runs the
library once on the images of every request waiting, then each expert those requests queried once, on the rows
of the requests that queried it (on a GPU: one bank of their union, cached by the pool, on every row), and merges
each request's experts: the consolidated forward of several queries at once (``PoE.core.consolidate.forward``). It
waits (a few ms at most) only while other prediction requests are still being received, so a lone request is never
delayed.
The event loop never runs a forward; it only awaits futures.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from PoE.core.consolidate import Rows
from PoE.core.consolidate import forward as consolidated
from PoE.core.data import Normalizer
from PoE.core.errors import PoEError
from PoE.core.networks import family_of
from PoE.core.networks.bank import grouped_on
from PoE.query.model import Prediction, TaskModel
from PoE.query.pool import Pool
from PoE.query.service.engine import Engine, Session
from PoE.query.service.limits import one_line

log = logging.getLogger("PoE.query.service")


@dataclass
class Job:
    """One request's images (RGB, N x 3 x S x S: uint8 pixels, or float in [0, 1]) for one consolidated model, and how
    many classes to show per image. ``loop``/``future``: where the answer goes (None under Ray Serve's batching)."""

    model: TaskModel
    x: torch.Tensor
    top: int = 5
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future | None = None


MAX_WAIT_MS = 1000.0  # the longest batching window accepted: a request may wait this long for others
TINY_BATCH = 8  # a forward of this many images or fewer runs on one torch thread (docs/service.md, "Threads")


def check_window(max_batch: int, max_wait_ms: float) -> None:
    """Refuse a batching window that could hold a request forever (``inf``, ``nan``) or is absurd."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise PoEError(f"max_batch must be a whole number of images, 1 or more; got {max_batch!r}")
    if not (isinstance(max_wait_ms, int | float) and math.isfinite(max_wait_ms) and 0 <= max_wait_ms <= MAX_WAIT_MS):
        raise PoEError(f"batch wait must be a number of milliseconds from 0 to {MAX_WAIT_MS:g}; got {max_wait_ms!r}")


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

    def __init__(
        self,
        gate: ExportGate,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        threads: int | None = None,
        engine: str = "torch",
    ) -> None:
        """``engine``: ``onnx`` runs the served modules as onnxruntime sessions (``PoE.query.service.engine``)."""
        check_window(max_batch, max_wait_ms)
        self.gate, self.max_batch, self.max_wait = gate, max_batch, max_wait_ms / 1e3
        # torch's thread count is per OS thread (each takes the process's default when it first runs an op): the
        # worker's count, read here where the worker set it, is made this thread's own before its first forward
        self.threads = threads or torch.get_num_threads()
        self.engine = Engine(gate, self.threads) if engine == "onnx" else None
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.arriving = 0  # prediction requests received but not yet submitted (see Arrivals)
        self.arriving_lock = threading.Lock()
        self.stats = BatchStats()
        self.thread = threading.Thread(target=self.run, name="poe-batcher", daemon=True)
        self.thread.start()

    async def submit(self, model: TaskModel, x: torch.Tensor, top: int) -> list[dict[str, Any]]:
        """The answer rows of ``x`` (see ``answer``), from a forward shared with the other waiting requests."""
        loop = asyncio.get_running_loop()
        job = Job(model, x, top, loop, loop.create_future())
        self.jobs.put(job)
        return await job.future

    def alive(self) -> bool:
        return self.thread.is_alive()

    def arrive(self, n: int) -> None:
        with self.arriving_lock:
            self.arriving += n

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)
        if self.engine is not None:
            self.engine.close()

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
        torch.set_num_threads(self.threads)
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = self.collect(first)
            try:
                with self.gate.forward():
                    preds = forward_all(batch, self.engine)
                self.stats.add(len(batch), sum(len(j.x) for j in batch))
                results: list[Any] = [answer(p, j.top) for p, j in zip(preds, batch, strict=True)]
            except Exception as e:  # answer every waiting request; the worker keeps serving
                log.exception("batch forward failed")
                results = [RuntimeError(f"prediction failed: {one_line(e)}")] * len(batch)
            loops: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
            for job, result in zip(batch, results, strict=True):
                loops.setdefault(job.loop, []).append((job.future, result))
            for loop, answers in loops.items():  # one wake-up of each event loop per batch, not one per request
                loop.call_soon_threadsafe(settle_all, answers)


def forward_all(batch: list[Job], engine: Engine | None = None) -> list[Prediction]:
    """``forward`` per pool: a model is answered by the pool it was built from, so requests taken before a swap
    (``PoE.query.service.core.Service.current``) are answered by the previous pool, later ones by the new one."""
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(batch):
        groups.setdefault(id(job.model.pool), []).append(i)
    preds: list[Prediction | None] = [None] * len(batch)
    for rows in groups.values():
        for i, p in zip(rows, forward(batch[rows[0]].model.pool, [batch[i] for i in rows], engine), strict=True):
            preds[i] = p
    return preds  # type: ignore[return-value]


@contextmanager
def threads_for(images: int) -> Iterator[None]:
    """One torch thread for a forward of ``TINY_BATCH`` images or fewer, the calling thread's count otherwise:
    a few 32x32 images do not fill several threads, which then spin-wait between the layers and burn the cores'
    time for nothing. ``torch.set_num_threads`` sets the calling thread's count (and the default of threads that
    have not run an op yet), so it is set back at once; every thread of the service that runs forwards sets its
    own count when it starts (``Batcher.run``, ``Service``'s executors)."""
    before = torch.get_num_threads()
    if images > TINY_BATCH or before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Served:
    """A pool's library and experts as the batcher runs them: in fp32, private eval-mode copies with each
    BatchNorm that follows a convolution folded into it (the family's fold, as for exports), one elementwise pass
    less per block; otherwise the pool's own modules. The pool's
    modules are never changed. Experts are copied when first queried, and again if the pool's module changes.
    With an ``engine`` (``PoE.query.service.engine``: fp32 on a CPU), each copy runs as its onnxruntime session
    once that is made."""

    def __init__(self, pool: Pool, engine: Engine | None = None) -> None:
        self.fold = pool.precision == "fp32"
        self.family = family_of(pool.cfg)
        self.lock = threading.Lock()
        self.engine = engine if self.fold and pool.device.type == "cpu" else None
        self.sessions: weakref.WeakKeyDictionary[nn.Module, Session] = weakref.WeakKeyDictionary()  # copy -> its own
        self.runs: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()  # forwards by torch
        self.library = self.copy(pool.library)
        self.normalize = Normalizer(pool.cfg.mean, pool.cfg.std, pool.device)
        self.experts: dict[str, tuple[nn.Module, nn.Module]] = {}  # task -> (the pool's module, the copy run)

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``module`` (a copy) on ``x``: by its session when it has one, else by torch (its session asked for once it
        has run the engine's ``after`` forwards)."""
        session = self.sessions.get(module) if self.engine is not None else None
        if session is not None:
            return session(x)
        if self.engine is not None:
            runs = self.runs[module] = self.runs.get(module, 0) + 1
            if runs == self.engine.after:  # busy enough to be worth an export: ask once
                self.engine.ask(module, tuple(x.shape[1:]), lambda s, m=module: self.sessions.__setitem__(m, s))
        return module(x)

    def copy(self, module: nn.Module) -> nn.Module:
        if not self.fold:
            return module
        with torch.inference_mode(False), torch.no_grad():  # parameters, not inference tensors
            folded = self.family.fold(copy.deepcopy(module).eval())
            return folded.to(memory_format=torch.channels_last).requires_grad_(False)

    def expert(self, pool: Pool, task: str) -> nn.Module:
        source = pool.experts[task]
        hit = self.experts.get(task)
        if hit is None or hit[0] is not source:
            with self.lock:
                hit = (source, self.copy(source))
                self.experts[task] = hit
        return hit[1]


SERVED: weakref.WeakKeyDictionary[Pool, Served] = weakref.WeakKeyDictionary()  # dropped with its pool
SERVED_LOCK = threading.Lock()


def served(pool: Pool, engine: Engine | None = None) -> Served:
    """The modules the batcher runs for ``pool`` (made on its first forward)."""
    with SERVED_LOCK:
        s = SERVED.get(pool)
        if s is None:
            s = SERVED[pool] = Served(pool, engine)
        return s


@torch.inference_mode()  # no autograd bookkeeping at all: less CPU than no_grad (docs/service.md)
def forward(pool: Pool, batch: list[Job], engine: Engine | None = None) -> list[Prediction]:
    """Every request of ``batch`` answered by one consolidated forward (``PoE.core.consolidate.forward``): the
    library once on every row, then the experts. Used by the hand-written batcher and by Ray Serve's
    ``@serve.batch`` alike. It runs ``served``'s copies, on one thread for a tiny batch (``threads_for``); on a
    GPU the experts the batch queried run as one bank of their union (cached by the pool)."""
    xs = [j.x for j in batch]
    if len({t.dtype for t in xs}) > 1:  # uint8 pixels beside [0, 1] floats: one scale for all before the cat
        xs = [t.float().div(255) if t.dtype == torch.uint8 else t for t in xs]
    run, union = served(pool, engine), grouped_on(pool.device)
    x = run.normalize(torch.cat(xs).to(pool.device)).contiguous(memory_format=torch.channels_last)
    groups = [Rows(j.model.tasks, len(j.x), j.model.module.order) for j in batch]
    classes = {t: n for j in batch for t, n in j.model.module.sizes.items()}

    def experts(tasks: Sequence[str], features: torch.Tensor) -> torch.Tensor:
        if union:
            return pool.bank(list(tasks), cached=True)(features)
        return torch.cat([run.run(run.expert(pool, t), features) for t in tasks], dim=1)

    with threads_for(len(x)), pool.runtime.autocast():
        logits = consolidated(lambda rows: run.run(run.library, rows), experts, classes, x, groups, union)
    return [job.model.prediction(out) for job, out in zip(batch, logits, strict=True)]


def answer(pred: Prediction, top: int) -> list[dict[str, Any]]:
    """Per image: the predicted class and the ``top`` most probable ones, one top-k over the whole request
    (``Prediction.top``'s numbers, without a tensor operation per image)."""
    if not bool(pred.probabilities.isfinite().all()):  # a wrong answer must not pass as one (answers.dumps)
        raise RuntimeError("the model gave non-finite probabilities")
    p, idx = pred.probabilities.topk(min(top, pred.probabilities.shape[1]), dim=1)
    classes, names = pred.classes, pred.names
    return [
        {
            "class_id": c,
            "class_name": n,
            "top": [
                {"id": classes[j], "name": names[j], "probability": round(q, 6)} for q, j in zip(ps, js, strict=True)
            ],
        }
        for c, n, ps, js in zip(pred.class_ids, pred.class_names, p.tolist(), idx.tolist(), strict=True)
    ]


def settle_all(answers: list[tuple[asyncio.Future, Any]]) -> None:
    for future, result in answers:
        settle(future, result)


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
