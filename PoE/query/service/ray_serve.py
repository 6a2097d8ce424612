"""The same FastAPI app as a Ray Serve deployment: ``Run_Service.py --serve --ray [--replicas N]``.

Each replica opens the pool itself and builds the app of ``PoE.query.service.app`` (``serve.ingress`` with the app
built at replica start, so the routes, errors and schema are the very same); Ray Serve's ``@serve.batch``
takes the hand-written batcher's place and calls the same ``forward``. Ray is optional
(``requirements-ray.txt``) and imported only here. See docs/service.md for a cluster of several machines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from PoE.core.errors import PoEError
from PoE.query.service.batching import BatchStats, Job, answer, check_window, forward_all
from PoE.query.service.engine import Engine, chosen
from PoE.query.service.run import Settings, plan, url_line

try:
    from ray import serve
except ImportError:  # the module stays importable (and --help works) without Ray
    serve = None

ROOT = Path(__file__).resolve().parents[3]
OBJECT_STORE_BYTES = 100 * 2**20  # the service passes no large objects through Ray; its minimum is 75 MiB
APP_NAME = "poe"


def batch(method: Any) -> Any:
    """``@serve.batch`` when Ray is installed (its window is set per replica in ``RayBatching``)."""
    return serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)(method) if serve is not None else method


class RayBatching:
    """The ``Batching`` of a replica: requests go through ``@serve.batch`` to ``forward`` on a thread."""

    def __init__(self, pool: Any, max_batch: int, max_wait_ms: float) -> None:
        self.pool, self.stats, self.gate = pool, BatchStats(), None  # the gate is the service's (set by the app)
        self.engine: Engine | None = None  # onnxruntime sessions (``engine``), made once the gate is known
        self.batched.set_max_batch_size(max_batch)  # requests per batch
        self.batched.set_batch_wait_timeout_s(max_wait_ms / 1e3)

    async def submit(self, model: Any, x: torch.Tensor, top: int) -> list[dict[str, Any]]:
        return await self.batched(Job(model, x, top))

    @batch
    async def batched(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        return await asyncio.to_thread(self.run, jobs)

    def run(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
        with self.gate.forward():
            preds = forward_all(jobs, self.engine)
        self.stats.add(len(jobs), sum(len(j.x) for j in jobs))
        return [answer(p, j.top) for p, j in zip(preds, jobs, strict=True)]

    def alive(self) -> bool:
        return True

    def arrive(self, n: int) -> None:  # Ray's batcher waits its window whatever arrives
        pass

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


if serve is not None:

    @serve.deployment(name="PoE", max_ongoing_requests=256)
    @serve.ingress()
    class Replica:
        """One replica: the pool in memory, the app over it, Ray's batching."""

        def __init__(self, settings: dict[str, Any]) -> None:
            self.settings = Settings(**settings)
            torch.set_num_threads(self.settings.threads or 1)
            self.pool = self.settings.open()
            self.batching = RayBatching(self.pool, self.settings.max_batch, self.settings.max_wait_ms)

        def __serve_build_asgi_app__(self) -> Any:
            app = self.settings.app(self.pool, batching=self.batching)
            self.batching.gate = app.state.service.gate
            if chosen(self.settings.engine, self.pool.device, self.pool.precision) == "onnx":
                self.batching.engine = Engine(self.batching.gate, self.settings.threads or 1)
            return app


def serve_ray(
    settings: Settings, host: str = "127.0.0.1", port: int = 8000, replicas: int = 1, address: str | None = None
) -> int:
    """Run the app as ``replicas`` Ray Serve replicas behind Ray's HTTP proxy on ``host:port``, on a local Ray
    started here or on the cluster at ``address`` (``start_ray``); until interrupted. Returns the exit code."""
    if serve is None:
        raise PoEError("--ray needs Ray Serve: pip install -r requirements-ray.txt")

    check_window(settings.max_batch, settings.max_wait_ms)
    if not 1 <= port < 65536:
        raise PoEError(f"--ray needs a fixed --port (1-65535; Ray's proxy cannot pick a free one), got {port}")
    _, threads = plan(replicas, settings.threads)
    settings = Settings(**{**asdict(settings.absolute()), "threads": threads})
    pool = settings.open()  # every part checked here first: a bad pool is one line, not a replica's traceback
    line = url_line(pool, host, port, f"Ray Serve, {replicas} replica(s), {threads} torch thread(s) each")
    del pool
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    stop = threading.Event()  # set before Ray starts, so a Ctrl-C during its start-up is not lost
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_stop(*_: Any) -> None:
        stop.set()

    for sig in previous:  # SIGINT too: started from a script's `cmd &`, Python ignores it
        signal.signal(sig, on_stop)
    try:
        start_ray(address, replicas, env)
        signal.signal(signal.SIGTERM, on_stop)  # ray.init sets its own (sys.exit: exit 15, Ray left unstopped)
        try:
            serve.start(http_options={"host": host, "port": port})
            app = Replica.options(num_replicas=replicas, ray_actor_options={"num_cpus": 1}).bind(asdict(settings))
            serve.run(app, name=APP_NAME, route_prefix="/")
            print(line, flush=True)
            while not stop.wait(0.5):
                pass
        finally:
            stop_serving(local=address is None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("server stopped", flush=True)
    return 0


def start_ray(address: str | None, replicas: int, env: dict[str, str]) -> None:
    """A local Ray (small: no dashboard, a 100 MiB object store), or the cluster at ``address``. Ray's own
    failures (its raylet not registered within Ray's fixed 30 s on an overloaded machine, no cluster at the
    address, ...) are one line, with nothing of Ray left running."""
    import ray

    if address is not None:
        check_reachable(address)
    try:
        if address is None:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, replicas),
                object_store_memory=OBJECT_STORE_BYTES,
                include_dashboard=False,
                log_to_driver=False,
                runtime_env={"env_vars": env},
            )
        else:
            ray.init(address=address, log_to_driver=False, runtime_env={"env_vars": env})
    except Exception as e:
        ray.shutdown()
        where = f"at {address}" if address else "on this machine"
        raise PoEError(f"Ray did not start {where}: {' '.join(str(e).split())[:300]}") from None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers on is one line at once: ``ray.init`` retries such an
    address for minutes in C++ code, where neither Ctrl-C nor SIGTERM reaches Python (measured: over 150 s)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():  # "auto" and other forms: left to Ray
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise PoEError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one there (ray start --head) "
            "or leave --ray_address out to start Ray on this machine"
        ) from None


def stop_serving(local: bool) -> None:
    """Take this app off a cluster (not the cluster's other apps), then leave Ray; a local Ray, started here, ends
    with its processes, Serve's included."""
    import ray

    if not local:
        serve.delete(APP_NAME)
    ray.shutdown()
