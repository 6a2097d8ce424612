"""What the service tests share: the README query, images as the API takes them, the Python API's answers to compare
with, and FastAPI's in-process client."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from PoE.query.pool import Pool

with warnings.catch_warnings():  # Starlette >= 1.x prefers httpx2 for its TestClient; httpx still works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

__all__ = ["QUERY", "TestClient", "b64", "encode", "expected", "same_predictions", "still_answers"]

QUERY = ["people", "vehicles_1", "vehicles_2"]


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def expected(pool: Pool, tasks: list[str], images, top: int = 5) -> list[dict]:
    pred = pool.query(tasks).predict(images)
    return [
        {"class_id": c, "class_name": n, "top": pred.top(i, top)}
        for i, (c, n) in enumerate(zip(pred.class_ids, pred.class_names, strict=True))
    ]


def same_predictions(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert (g["class_id"], g["class_name"]) == (w["class_id"], w["class_name"])
        assert [(c["id"], c["name"]) for c in g["top"]] == [(c["id"], c["name"]) for c in w["top"]]
        for a, b in zip(g["top"], w["top"], strict=True):
            assert a["probability"] == pytest.approx(b["probability"], abs=2e-6)


def still_answers(client, pool, images) -> None:
    """After a bad request: a good one is answered, and correctly."""
    r = client.post("/api/predict", json={"tasks": ["people", "trees"], "images": [b64(encode(images[0]))]})
    assert r.status_code == 200, r.text
    same_predictions(r.json()["predictions"], expected(pool, ["people", "trees"], images[:1]))
