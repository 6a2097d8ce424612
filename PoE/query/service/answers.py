"""How the prediction routes write their answers: orjson where it is installed (a README-query answer in about a
twentieth of ``json.dumps``' time, docs/service.md), else the standard library's json, as Starlette writes it.
orjson writes NaN as ``null`` where json refuses it: the batcher refuses non-finite probabilities before
(``batching.answer``), so no answer carries one."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import JSONResponse

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    orjson = None


def dumps(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON."""
    if orjson is None:  # pragma: no cover
        return json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return orjson.dumps(content)


class Answer(JSONResponse):
    """A JSONResponse written by ``dumps``."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
