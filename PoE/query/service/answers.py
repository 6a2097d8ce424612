"""How the prediction routes write their answers: by orjson, far faster than ``json.dumps`` on them (docs/service.md,
"A fast path for the binary body"). orjson writes NaN as ``null`` where json refuses it: the batcher refuses
non-finite probabilities before (``batching.answer``), so no answer carries one."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


def dumps(content: Any) -> bytes:
    """``content`` as compact UTF-8 JSON."""
    return orjson.dumps(content)


class Answer(JSONResponse):
    """A JSONResponse written by ``dumps``."""

    def render(self, content: Any) -> bytes:
        return dumps(content)
