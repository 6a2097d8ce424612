"""Request and error bodies of the JSON API: strict types and bounds, so that the OpenAPI schema says what is
accepted and which refusals a client may get (schemathesis checks both)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from PoE.query.service.limits import DEFAULT_TOP, MAX_IMAGES

TASKS = Field(min_length=1, examples=[["people", "vehicles_1"]], description="primitive tasks, each named once")


class QueryBody(BaseModel):
    """``POST /api/query``: strict types, so that ``"tasks": "people"`` is refused rather than split into letters."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[StrictStr] = TASKS
    evaluate: StrictBool = False


class PredictBody(BaseModel):
    """``POST /api/predict``: images as base64 PNG or JPEG (a ``data:`` URL prefix is accepted)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[StrictStr] = TASKS
    images: list[StrictStr] = Field(
        min_length=1,
        description=f"base64 PNG or JPEG images, 1 to {MAX_IMAGES} (more: 413), each of the pool's image size",
    )
    top: StrictInt = Field(DEFAULT_TOP, ge=1, description="classes shown per image, most probable first")


class ErrorBody(BaseModel):
    """Every refusal: one line saying what was wrong and what is accepted."""

    error: str


REFUSALS = {
    400: "bad request: the one-line error says what was wrong and what is accepted",
    404: "unknown model or path",
    413: "body or image count over the limit (see /api/pool: max_body_bytes, max_images)",
    422: "the request is well-formed but cannot be answered from this pool's test data (e.g. no test images of "
    "the query's classes)",
    415: "a body of another Content-Type than the route accepts",
    503: "accuracy is unavailable on this server (no usable test data) or the prediction worker has stopped",
    507: "the server has no room to write the model (disk full); retry later",
}


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the routes: each code answered with ``ErrorBody``."""
    return {code: {"model": ErrorBody, "description": REFUSALS[code]} for code in codes}


USAGE = {
    "/api/query": 'send JSON {"tasks": [TASK, ...], "evaluate": false}',
    "/api/predict": 'send JSON {"tasks": [TASK, ...], "images": [BASE64_PNG_OR_JPEG, ...], "top": 5}',
    "/api/predict/upload": "send multipart/form-data with one or more 'tasks' fields, one or more 'images' files "
    "(PNG or JPEG) and optionally 'top'",
    "/api/predict/raw": "send ?tasks=TASK&tasks=TASK[&top=5] with one PNG or JPEG file as the body (Content-Type "
    "image/png or image/jpeg) or N images' uint8 RGB pixels, N x S x S x 3 for the pool's image size S "
    "(Content-Type application/octet-stream)",
}

RAW_BODY = {  # /api/predict/raw reads its body itself (no pydantic model): the schema is written out
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": f"1 to {MAX_IMAGES} images' uint8 RGB pixels, N x S x S x 3 in that order (numpy's "
                    "tobytes()), S the pool's image_size (GET /api/pool): the length gives N",
                }
            },
        },
    }
}
