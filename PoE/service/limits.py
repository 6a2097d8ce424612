"""Bounds on what one request may ask for, and the one-line 4xx every refusal is answered with."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_IMAGES = 256
DEFAULT_TOP = 5


def one_line(text: object) -> str:
    return " ".join(str(text).split())


class ClientError(HTTPException):
    """A 4xx answered as ``{"error": detail}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status_code=status, detail=one_line(message))


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
