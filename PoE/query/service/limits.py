"""Bounds on what one request may ask for, and the one-line 4xx every refusal is answered with."""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 256
DEFAULT_TOP = 5
MAX_EXPORT_BYTES = 64 * 1024 * 1024  # exported models kept in memory, per worker (0.6-2.9 MB each here)


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class ClientError(HTTPException):
    """A 4xx answered as ``{"error": detail}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status_code=status, detail=one_line(message))


class LRU:
    """A thread-safe map that forgets its least recently used entries beyond ``size`` (counted by ``weigh``,
    one per entry by default)."""

    def __init__(self, size: int, weigh: Any = None) -> None:
        self.size, self.weigh = size, weigh or (lambda value: 1)
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.weight = 0
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
            if key in self.items:
                self.weight -= self.weigh(self.items[key])
            self.items[key] = value
            self.weight += self.weigh(value)
            self.items.move_to_end(key)
            while self.weight > self.size and len(self.items) > 1:
                self.weight -= self.weigh(self.items.popitem(last=False)[1])


def check_count(n: int) -> None:
    if n == 0:
        raise ClientError(400, "no images given; send one or more PNG or JPEG images")
    if n > MAX_IMAGES:
        raise ClientError(413, f"{n} images in one request; at most {MAX_IMAGES}")


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident memory of a process (Linux; None elsewhere or when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def private_bytes(pid: int | str = "self") -> int | None:
    """Memory of a process that no other process shares: what one more worker costs (resident memory also
    counts torch's shared libraries, the same pages in every worker)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
        return sum(int(line.split()[1]) * 1024 for line in lines if line.startswith(("Private_Clean", "Private_Dirty")))
    except (OSError, ValueError, IndexError):
        return None


def worker_pids() -> list[int]:
    """This process and its sibling workers (same parent, same command line but for numbers such as
    multiprocessing's pipe handle: ``--workers N``), in pid order."""
    me = Path("/proc/self/cmdline")
    try:
        cmdline, parent = re.sub(rb"\d+", b"", me.read_bytes()), os.getppid()
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    except OSError:
        return [os.getpid()]
    found = []
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == parent and re.sub(rb"\d+", b"", Path(f"/proc/{pid}/cmdline").read_bytes()) == cmdline:
                found.append(pid)
        except (OSError, ValueError, IndexError):
            continue
    return sorted(set(found) | {os.getpid()})


def memory() -> dict[str, Any]:
    """This worker's memory and every worker's (one entry unless the server runs ``--workers N``)."""
    workers = [{"pid": pid, "rss_bytes": rss_bytes(pid), "private_bytes": private_bytes(pid)} for pid in worker_pids()]
    return {
        "pid": os.getpid(),
        "rss_bytes": rss_bytes(),
        "private_bytes": private_bytes(),
        "workers": workers,
        "workers_private_bytes": sum(w["private_bytes"] or 0 for w in workers),
    }


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
