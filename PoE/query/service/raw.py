"""``POST /api/predict/raw``: the body is the image (one PNG or JPEG file, or uint8 pixels), tasks and top in the
query string; and its fast path.

The route's checks and answer are ``answer_raw``, called by the FastAPI route and by ``FastRaw``. ``FastRaw`` is an ASGI
middleware that answers a well-formed request of this route itself, without FastAPI's routing, dependency solving
and exception layers, a large part of the event loop's time per predict (docs/service.md, "A fast path for the
binary body"). Anything it does not recognise as well formed (an unknown or repeated parameter, a missing ``tasks``, a
``top`` that is not a plain positive number) goes on to the FastAPI route, which answers it, with its one-line 4xx.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import ClientDisconnect

from PoE.core.errors import PoEError
from PoE.query.service.answers import dumps
from PoE.query.service.core import Service
from PoE.query.service.limits import ClientError, one_line
from PoE.query.service.schemas import USAGE

log = logging.getLogger("PoE.query.service")

RAW_PATH = "/api/predict/raw"
PIXELS = "application/octet-stream"  # the raw route's body of pixels; image/* is one image file
GONE = "the client went away before its body was received"
PLAIN_TOP = re.compile(r"[1-9][0-9]{0,5}")  # what the fast path reads as top itself; anything else: FastAPI's


def task_names(values: list[str]) -> list[str]:
    """Task names from form fields or query parameters: each repeated, or separated by commas or spaces."""
    return [t for value in values for t in re.split(r"[,\s]+", value) if t]


def content_kind(headers: Any) -> str:
    """The media type of a Content-Type header, lower case, without parameters."""
    return headers.get("content-type", "").partition(";")[0].strip().lower()


async def answer_raw(
    service: Service,
    tasks: list[str],
    top: int,
    kind: str,
    body: Callable[[], Awaitable[bytes]],
    arrival: Any = None,
) -> dict[str, Any]:
    """The route's answer, its checks in order: the tasks (400), the Content-Type (415), the body (400, 413)."""
    usage = USAGE[RAW_PATH]
    model = (await service.current()).model(task_names(tasks))  # task errors first, as on /api/predict
    if kind != PIXELS and not kind.startswith("image/"):
        given = f"Content-Type {kind[:80]!r}" if kind else "a body without a Content-Type"
        raise ClientError(415, f"{given} is not accepted here; {usage}")
    data = await body()
    if not data:
        raise ClientError(400, f"empty body: no image given; {usage}")
    images = service.pixels(data) if kind == PIXELS else [data]
    return await service.predict(model, images, top, arrival)


def error_of(exc: Exception, path: str = RAW_PATH) -> tuple[int, str]:
    """A refusal's status and one line, as the app's exception handlers answer it; anything else a logged 500."""
    if isinstance(exc, ClientError):
        return exc.status_code, exc.detail
    if isinstance(exc, PoEError):
        return 400, one_line(exc)
    if isinstance(exc, ClientDisconnect):  # the client's doing, not the server's failure (and nobody reads it)
        return 400, GONE
    log.exception("request %s failed", path)
    return 500, one_line(f"internal error: {exc}")


def plain_query(query_string: bytes) -> tuple[list[str], int] | None:
    """(tasks, top) of a query string holding only ``tasks`` (once or more) and at most one plain ``top``; else
    None (the FastAPI route then reads and refuses it). Parsed as Starlette parses it."""
    tasks, top = [], None
    for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if key == "tasks":
            tasks.append(value)
        elif key == "top" and top is None and PLAIN_TOP.fullmatch(value):
            top = int(value)
        else:
            return None
    return (tasks, 5 if top is None else top) if tasks else None


class FastRaw:
    """ASGI middleware: answers a well-formed ``POST /api/predict/raw`` by ``answer_raw`` (see the module's
    docstring); every other request goes on to the app."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        plain = None
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == RAW_PATH:
            plain = plain_query(scope["query_string"])
        if plain is None:
            return await self.app(scope, receive, send)
        given = next((v for k, v in scope["headers"] if k == b"content-type"), b"")  # the first, as Starlette reads
        kind = content_kind({"content-type": given.decode("latin-1")})

        async def body() -> bytes:
            chunks, more = [], True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect  # as Starlette's Request.body raises it on the route
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            return b"".join(chunks)

        try:
            status, content = 200, await answer_raw(self.service, *plain, kind, body, scope.get("poe.arrival"))
        except Exception as e:
            status, line = error_of(e)
            content = {"error": line}
        data = dumps(content)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})
