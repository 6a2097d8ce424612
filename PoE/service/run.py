"""Running the app: bind the port first (a port in use is a one-line error), then uvicorn."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

from PoE.errors import PoEError
from PoE.pool import Pool
from PoE.service.app import create_app
from PoE.service.limits import one_line


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
