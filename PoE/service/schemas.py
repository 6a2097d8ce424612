"""Request bodies of the JSON API (strict types, so the OpenAPI schema says what is accepted)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from PoE.service.limits import DEFAULT_TOP


class QueryBody(BaseModel):
    """``POST /api/query``: strict types, so that ``"tasks": "people"`` is refused rather than split into letters."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[StrictStr] = Field(examples=[["people", "vehicles_1"]])
    evaluate: StrictBool = False


class PredictBody(BaseModel):
    """``POST /api/predict``: images as base64 PNG or JPEG (a ``data:`` URL prefix is accepted)."""

    model_config = ConfigDict(extra="forbid")
    tasks: list[StrictStr] = Field(examples=[["people", "vehicles_1"]])
    images: list[StrictStr]
    top: StrictInt = DEFAULT_TOP


USAGE = {
    "/api/query": 'send JSON {"tasks": [TASK, ...], "evaluate": false}',
    "/api/predict": 'send JSON {"tasks": [TASK, ...], "images": [BASE64_PNG_OR_JPEG, ...], "top": 5}',
    "/api/predict/upload": "send multipart/form-data with one or more 'tasks' fields, one or more 'images' files "
    "(PNG or JPEG) and optionally 'top'",
}
