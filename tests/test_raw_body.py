"""``POST /api/predict/raw``: the image file (PNG or JPEG) or the raw uint8 pixels as the body, tasks and top in the
query string. It answers exactly what ``/api/predict`` answers for the same images of the shipped pool, refuses
bad bodies with the same one-line 4xx, and the server answers the next request as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from PoE.query.service import MAX_IMAGES

from .api import QUERY, b64, encode, expected, same_predictions, still_answers

RAW = "/api/predict/raw"
PNG, JPEG, PIXELS = ({"content-type": t} for t in ("image/png", "image/jpeg", "application/octet-stream"))


def as_json(client, tasks: list[str], files: list[bytes], top: int = 5) -> dict:
    r = client.post("/api/predict", json={"tasks": tasks, "images": [b64(f) for f in files], "top": top})
    assert r.status_code == 200, r.text
    return r.json()


def test_a_png_or_jpeg_body_answers_what_the_json_route_answers(client, pool, images):
    for im in images:
        png = encode(im)
        r = client.post(f"{RAW}?tasks=people&tasks=vehicles_1&tasks=vehicles_2&top=3", content=png, headers=PNG)
        assert r.status_code == 200, r.text
        assert r.json() == as_json(client, QUERY, [png], top=3)
    same_predictions(r.json()["predictions"], expected(pool, QUERY, images[-1:], top=3))
    jpeg = encode(images[0], "JPEG")
    r = client.post(f"{RAW}?tasks=vehicles_2,people", content=jpeg, headers=JPEG)  # commas; top by default
    assert r.status_code == 200, r.text
    assert r.json() == as_json(client, ["vehicles_2", "people"], [jpeg])
    decoded = np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
    same_predictions(r.json()["predictions"], expected(pool, ["vehicles_2", "people"], decoded))


def test_raw_pixels_answer_what_the_json_route_answers(client, pool, images):
    """N x 32 x 32 x 3 uint8 pixels (numpy's tobytes()): the same answer as the same images sent as PNG."""
    for batch in (images[:1], images):
        r = client.post(
            f"{RAW}?tasks=people&tasks=vehicles_1&tasks=vehicles_2&top=4", content=batch.tobytes(), headers=PIXELS
        )
        assert r.status_code == 200, r.text
        assert r.json() == as_json(client, QUERY, [encode(im) for im in batch], top=4)
    same_predictions(r.json()["predictions"], expected(pool, QUERY, images, top=4))


def test_the_fast_path_answers_as_the_route(client, images, monkeypatch):
    """A well-formed request is answered by ``FastRaw`` (no FastAPI routing); one it does not read itself (``top=05``)
    by the FastAPI route: the same answers and refusals, each path taken."""
    from PoE.query.service import app, raw

    taken, real = [], raw.answer_raw

    def counted(path):
        async def call(*args, **kwargs):
            taken.append(path)
            return await real(*args, **kwargs)

        return call

    monkeypatch.setattr(raw, "answer_raw", counted("fast"))
    monkeypatch.setattr(app, "answer_raw", counted("route"))
    for query, body in (("tasks=people,vehicles_1", images[:2].tobytes()), ("tasks=nope", images[:1].tobytes())):
        fast = client.post(f"{RAW}?{query}&top=5", content=body, headers=PIXELS)
        route = client.post(f"{RAW}?{query}&top=05", content=body, headers=PIXELS)
        assert (fast.status_code, fast.json()) == (route.status_code, route.json())
        assert fast.headers["content-type"] == route.headers["content-type"] == "application/json"
    assert fast.status_code == 400 and "nope" in fast.json()["error"]
    assert taken == ["fast", "route"] * 2


def test_the_schema_gives_both_kinds_of_body_and_the_pools_tasks(client, pool):
    op = client.get("/openapi.json").json()["paths"][RAW]["post"]
    assert {"image/png", "image/jpeg", "application/octet-stream"} <= set(op["requestBody"]["content"])
    assert op["requestBody"]["required"] is True
    tasks = next(p for p in op["parameters"] if p["name"] == "tasks")
    assert tasks["in"] == "query" and tasks["required"] is True
    assert tasks["schema"]["items"]["enum"] == list(pool.cfg.tasks)
    assert {"400", "413", "415"} <= set(op["responses"])


GIF = io.BytesIO()
Image.new("RGB", (32, 32)).save(GIF, "GIF")
BIG = np.zeros((64, 64, 3), np.uint8)
IMAGE = "accepted: PNG or JPEG"
USAGE = "application/octet-stream"

BAD = [
    ("no tasks", RAW, b"ok", PNG, 400, ("query.tasks: Field required", USAGE, "known tasks: ")),
    ("unknown task", f"{RAW}?tasks=people,ghosts", b"ok", PNG, 400, ("unknown task 'ghosts'", "known tasks: ")),
    ("repeated task", f"{RAW}?tasks=people&tasks=people", b"ok", PNG, 400, ("task 'people' is named twice",)),
    ("empty tasks", f"{RAW}?tasks=", b"ok", PNG, 400, ("empty query: name at least one task",)),
    ("unknown parameter", f"{RAW}?tasks=people&tops=3", b"ok", PNG, 400, ("unknown query parameter 'tops'", USAGE)),
    ("top zero", f"{RAW}?tasks=people&top=0", b"ok", PNG, 400, ("query.top: Input should be greater than or equal",)),
    ("top not an int", f"{RAW}?tasks=people&top=x", b"ok", PNG, 400, ("query.top: Input should be a valid integer",)),
    ("text body", f"{RAW}?tasks=people", b"ok", {"content-type": "text/plain"}, 415, ("'text/plain' is not", USAGE)),
    ("no content type", f"{RAW}?tasks=people", b"ok", {}, 415, ("without a Content-Type", USAGE)),
    ("json body", f"{RAW}?tasks=people", b"{}", {"content-type": "application/json"}, 415, (USAGE,)),
    ("empty file", f"{RAW}?tasks=people", b"", PNG, 400, ("empty body: no image given", USAGE)),
    ("empty pixels", f"{RAW}?tasks=people", b"", PIXELS, 400, ("empty body: no image given", USAGE)),
    ("not an image", f"{RAW}?tasks=people", b"hello", PNG, 400, ("image 0 is not an image", IMAGE)),
    ("truncated PNG", f"{RAW}?tasks=people", b"cut", PNG, 400, ("image 0 is corrupt or truncated", IMAGE)),
    ("GIF", f"{RAW}?tasks=people", GIF.getvalue(), {"content-type": "image/gif"}, 400, ("image 0 is GIF", IMAGE)),
    ("wrong size", f"{RAW}?tasks=people", encode(BIG), PNG, 400, ("image 0 is 64x64; this pool takes 32x32",)),
    ("pixels not whole images", f"{RAW}?tasks=people", bytes(3072 + 5), PIXELS, 400, ("3,077 bytes", "3,072 bytes")),
    (
        "too many images",
        f"{RAW}?tasks=people",
        bytes(3072 * (MAX_IMAGES + 1)),
        PIXELS,
        413,
        (f"{MAX_IMAGES + 1} images in one request; at most {MAX_IMAGES}",),
    ),
    ("body over 8 MB", f"{RAW}?tasks=people", b"x" * (8 * 2**20 + 1), PNG, 413, ("over the limit of 8,388,608",)),
    ("streamed over 8 MB", f"{RAW}?tasks=people", iter([b"x" * 2**20] * 9), PIXELS, 413, ("over the limit",)),
]


@pytest.mark.parametrize("url,body,headers,status,says", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_raw_requests_are_one_line_errors_and_the_server_goes_on(
    client, pool, images, url, body, headers, status, says
):
    swap = {b"ok": encode(images[0]), b"cut": encode(images[0])[:60]}
    r = client.post(url, content=swap.get(body, body) if isinstance(body, bytes) else body, headers=headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert "\n" not in error and "Traceback" not in error
    for part in says:
        assert part in error, error
    still_answers(client, pool, images)


def call(app, url: str, chunks: list[bytes], headers: dict) -> tuple[int, bytes]:
    """``app`` called as a server would, the client going away after ``chunks`` (what TestClient cannot send)."""
    import asyncio

    path, _, query = url.partition("?")
    scope = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "path": path, "root_path": ""}
    scope.update(query_string=query.encode(), headers=[(k.encode(), v.encode()) for k, v in headers.items()])
    messages = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    sent: dict = {"body": b""}

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.setdefault("status", message.get("status"))
        sent["body"] += message.get("body", b"")

    asyncio.run(app(scope, receive, send))
    return sent["status"], sent["body"]


@pytest.mark.parametrize("path", ["fast", "route"])
def test_a_client_gone_mid_body_is_no_server_failure(client, pool, images, monkeypatch, caplog, path):
    """Both paths refuse it alike, as a client's doing: a 400 line, no 500, no traceback logged."""
    from PoE.query.service import raw

    if path == "route":
        monkeypatch.setattr(raw, "plain_query", lambda query: None)
    status, body = call(client.app, f"{RAW}?tasks=people", [images[:1].tobytes()[:1000]], PIXELS)
    assert (status, body) == (400, b'{"error":"the client went away before its body was received"}')
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    still_answers(client, pool, images)


@pytest.mark.parametrize("query", ["tasks=people,{}", "tasks={}&tasks={}"])
def test_a_long_task_name_is_not_echoed_whole(client, query):
    r = client.post(f"{RAW}?{query.format(*['x' * 8000] * 2)}", content=b"x", headers=PNG)
    assert r.status_code == 400 and "'" + "x" * 80 + "'" in r.json()["error"]
    assert len(r.json()["error"]) < 1000, len(r.json()["error"])
