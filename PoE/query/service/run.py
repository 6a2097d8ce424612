"""Running the app: bind the port first (a port in use is a one-line error), then one uvicorn process, several
worker processes on that one port (``workers``), or Ray Serve replicas (``PoE.query.service.ray_serve``)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from fastapi import FastAPI

from PoE.core.errors import PoEError
from PoE.query.pool import Pool
from PoE.query.service.app import create_app
from PoE.query.service.batching import check_window
from PoE.query.service.limits import one_line

SETTINGS_ENV = "POE_SERVICE_SETTINGS"  # how the supervisor hands its settings to worker processes
SUPERVISOR_ENV = "POE_SUPERVISOR_PID"  # and its process id: a worker whose parent is another has lost it
PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent dies
ORPHAN_POLL_S, ORPHAN_STOP_S = 0.5, 10.0  # how often a worker looks for its parent; how long it may take to stop
WORKER_START_S = 300  # how long a worker may take to import torch and open the pool before uvicorn restarts it
MAX_THREADS = 4  # intra-op threads beyond which a forward of a few 32x32 images only waits on its threads


@dataclass(frozen=True)
class Settings:
    """What a worker process (or a Ray replica) needs to open the pool and build the app by itself."""

    db: str = "DB_PoE"
    dataset: str = "cifar100"
    device: str = "cpu"
    precision: str = "fp32"
    data_root: str | None = None
    max_batch: int = 64
    max_wait_ms: float = 5.0
    threads: int | None = None  # torch intra-op threads per worker; None: ``plan`` decides
    pool_digest: str | None = None  # --pool_digest: every worker (and every reload) refuses another pool
    engine: str = "auto"  # --engine: how the batcher runs the modules (PoE.query.service.engine)

    def absolute(self) -> Settings:
        """Paths made absolute, so that a worker started elsewhere (a Ray node) reads the same files."""
        data_root = str(Path(self.data_root).absolute()) if self.data_root is not None else None
        return replace(self, db=str(Path(self.db).absolute()), data_root=data_root)

    def open(self) -> Pool:
        return Pool.open(self.db, self.dataset, self.device, self.precision, expected_digest=self.pool_digest)

    def app(self, pool: Pool | None = None, **kwargs) -> FastAPI:
        """The app over ``pool`` (opened from the settings when None), torch's threads set first."""
        torch.set_num_threads(self.threads or 1)
        pool = pool or self.open()
        kwargs = {"max_batch": self.max_batch, "max_wait_ms": self.max_wait_ms, "engine": self.engine, **kwargs}
        return create_app(pool, self.data_root, **kwargs)


def cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan(workers: int | None, threads: int | None, n_cpus: int | None = None) -> tuple[int, int]:
    """(workers, torch threads per worker). Each worker keeps one core busy with HTTP, JSON and decoding and
    gives its forwards the rest of its share, at most ``MAX_THREADS``: a forward of a few small images spread
    over many threads is slower than over one. Default workers: one per two cores (a worker is an event loop plus
    a forward thread); docs/service.md has the measurements."""
    n = n_cpus or cpus()
    if workers is not None and workers > 4 * n:
        raise PoEError(
            f"--workers {workers} is more than 4 per CPU ({n} here): each worker holds the pool and a "
            f"forward thread; use at most {4 * n}"
        )
    workers = workers or max(1, n // 2)
    share = max(1, n // workers)
    return workers, threads or max(1, min(MAX_THREADS, share - 1))


def listen(host: str, port: int) -> socket.socket:
    """Bind before uvicorn does, so that a port in use is a one-line error (uvicorn logs and exits 1)."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto must say TCP: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and without
        # it a keep-alive client waits tens of milliseconds per request (Nagle's algorithm against delayed ACKs)
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


def url_line(pool: Pool, host: str, port: int, how: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return (
        f"serving {pool.root} ({len(pool.experts)} experts) at http://{shown}:{port}/ (API docs: /docs; "
        f"{how}); Ctrl-C stops"
    )


def worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process: the pool opened again from the supervisor's settings."""
    follow_parent(int(os.environ.get(SUPERVISOR_ENV, os.getppid())))
    return Settings(**json.loads(os.environ[SETTINGS_ENV])).app()


def follow_parent(parent: int) -> None:
    """Stop this worker (SIGTERM: uvicorn closes the socket and stops) when the supervisor ``parent`` dies, even by
    SIGKILL, which it cannot pass on: an orphaned worker kept the port, and a restart failed with "address already
    in use". Linux signals it at once (PR_SET_PDEATHSIG); a thread watching the parent's id covers other systems
    and a parent gone before this ran; a worker that has not stopped ``ORPHAN_STOP_S`` later exits."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (e.g. a static build): the thread alone
            pass

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(ORPHAN_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(ORPHAN_STOP_S)
        os._exit(1)

    threading.Thread(target=watch, name="follow-parent", daemon=True).start()


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, workers: int | None = 1) -> int:
    """Serve until interrupted; returns the exit code. Prints one line with the URL (port 0: a free port, the
    line says which). ``workers`` > 1: that many processes accept on the one port, each with the pool in
    memory and its own batcher (None: ``plan``'s default)."""
    import uvicorn

    check_window(settings.max_batch, settings.max_wait_ms)
    workers, threads = plan(workers, settings.threads)
    settings = replace(settings.absolute(), threads=threads)
    pool = settings.open()  # every part checked once here: a bad pool is one line before anything listens
    sock = listen(host, port)
    port = sock.getsockname()[1]
    how = f"{workers} worker process(es), {threads} torch thread(s) each"
    try:
        if workers == 1:
            app = settings.app(pool)
            print(url_line(pool, host, port, how), flush=True)
            config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
            uvicorn.Server(config).run(sockets=[sock])
        else:
            from uvicorn.supervisors import Multiprocess

            print(url_line(pool, host, port, how), flush=True)
            del pool
            gc.collect()
            os.environ[SETTINGS_ENV] = json.dumps(asdict(settings))
            os.environ[SUPERVISOR_ENV] = str(os.getpid())
            # uvicorn kills a worker that does not answer its health check within the timeout, and a worker
            # answers only once torch is imported and the pool opened: 5 s (the default) on a busy machine
            # killed and restarted every worker forever
            config = uvicorn.Config(
                "PoE.query.service.run:worker_app",
                factory=True,
                workers=workers,
                access_log=False,
                log_level="warning",
                timeout_worker_healthcheck=WORKER_START_S,
            )
            Multiprocess(config, sockets=[sock]).run()
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C / SIGINT, then re-raises it: a normal stop
        pass
    print("server stopped", flush=True)
    return 0
