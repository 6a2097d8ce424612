"""The HTTP service on the shipped pool and real CIFAR-100 test images: every endpoint agrees with the Python
API and the CLI, every bad input is a one-line 4xx after which the server still answers, the .pt2 download
runs, and concurrent requests share one forward."""

from __future__ import annotations

import io
import json
import re
import socket
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from PoE.cli import main_service
from PoE.query.service import MAX_IMAGES, create_app
from PoE.query.service.batching import served

from .api import QUERY, TestClient, b64, encode, expected, same_predictions, still_answers
from .conftest import ROOT


# ------------------------------------------------------------------ endpoints
def test_healthz_pool_page_and_docs(client, pool):
    assert client.get("/healthz").json()["status"] == "ok"
    info = client.get("/api/pool").json()
    want = pool.describe()
    assert info["dataset"] == "cifar100" and info["tasks"] == want["tasks"]
    people = next(t for t in info["tasks"] if t["name"] == "people")
    assert people["present"] and people["accuracy"] > 0
    assert [c["name"] for c in people["classes"]] == ["baby", "boy", "girl", "man", "woman"]
    page = client.get("/")
    assert page.status_code == 200 and "Pool of Experts" in page.text and "/web/app.js" in page.text
    assert client.get("/web/app.js").status_code == 200 and client.get("/web/style.css").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text  # the docs' scripts come from the server itself
    scripts = re.findall(r'src="([^"]+\.js)"', docs.text)
    assert scripts and all(client.get(src).status_code == 200 for src in scripts)
    assert client.get("/redoc").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/pool", "/api/query", "/api/predict", "/api/predict/upload", "/api/models/{name}"} <= set(paths)


def test_docs_give_the_packages_version_and_the_page_its_icon(client):
    import tomllib

    import PoE

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert project["version"] == {"attr": "PoE.__version__"}  # the package's version is written once
    assert client.get("/openapi.json").json()["info"]["version"] == PoE.__version__ != "0.1.0"
    icon = re.search(r'<link rel="icon" href="([^"]+)"', client.get("/").text)
    assert icon and client.get(icon.group(1)).status_code == 200


def test_query_with_evaluation_equals_the_cli(client, pool, data_root, capsys):
    r = client.post("/api/query", json={"tasks": QUERY, "evaluate": True})
    assert r.status_code == 200, r.text
    got = r.json()
    assert main_service(["--queriedTask", *QUERY, "--json", "--device", "cpu", "--data_root", str(data_root)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["tasks"] == cli["tasks"] == QUERY
    assert (got["accuracy"], got["n_test"]) == (cli["accuracy"], cli["n_test"])
    assert (got["flops"], got["params"]) == (cli["flops"], cli["params"])
    assert [c["id"] for c in got["classes"]] == cli["classes"]
    assert [c["name"] for c in got["classes"]] == cli["class_names"]
    assert got["build_ms"] > 0 and got["model"].startswith("/api/models/") and got["model"].endswith(".pt2")


@pytest.mark.parametrize("tasks", [["people"], ["trees", "fish"], QUERY, "all"])
def test_query_cost_equals_task_model_cost(client, pool, tasks):
    tasks = list(pool.cfg.tasks) if tasks == "all" else tasks
    r = client.post("/api/query", json={"tasks": tasks})
    assert r.status_code == 200, r.text
    assert "accuracy" not in r.json()
    assert (r.json()["flops"], r.json()["params"]) == pool.query(tasks).cost()


def test_predict_json_equals_python_api(client, pool, images):
    r = client.post("/api/predict", json={"tasks": QUERY, "images": [b64(encode(im)) for im in images], "top": 15})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["id"] for c in body["classes"]] == pool.query(QUERY).classes
    same_predictions(body["predictions"], expected(pool, QUERY, images, top=15))
    data_url = "data:image/png;base64," + b64(encode(images[1]))  # what a browser's FileReader gives
    r = client.post("/api/predict", json={"tasks": ["vehicles_2", "people"], "images": [data_url]})
    same_predictions(r.json()["predictions"], expected(pool, ["vehicles_2", "people"], images[1:2]))


def test_predict_upload_equals_python_api(client, pool, images):
    files = [("images", (f"{i}.png", encode(im), "image/png")) for i, im in enumerate(images[:3])]
    jpeg = encode(images[3], "JPEG")
    files.append(("images", ("3.jpg", jpeg, "image/jpeg")))
    for tasks in ({"tasks": QUERY}, {"tasks": "people, vehicles_1,vehicles_2"}):
        r = client.post("/api/predict/upload", data=tasks, files=files)
        assert r.status_code == 200, r.text
        decoded = [*images[:3], np.array(Image.open(io.BytesIO(jpeg)).convert("RGB"))]
        same_predictions(r.json()["predictions"], expected(pool, QUERY, np.stack(decoded)))


def test_model_download_runs_and_gives_the_models_logits(client, pool, images, tmp_path):
    url = client.post("/api/query", json={"tasks": ["vehicles_1", "people"]}).json()["model"]
    r = client.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert 'filename="poe_vehicles_1__people.pt2"' in r.headers["content-disposition"]
    path = tmp_path / "model.pt2"
    path.write_bytes(r.content)
    program = torch.export.load(str(path)).module()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    model = pool.query(["vehicles_1", "people"])
    torch.testing.assert_close(program(x), model.logits(images), rtol=1e-4, atol=1e-4)
    assert client.get(url).content == r.content  # exported once, then served from the app's cache


def test_batching_shares_one_library_forward(pool, data_root, images):
    """Twelve concurrent requests of mixed queries: fewer forwards than requests, each answer still exact."""
    queries = [["people"], QUERY, ["trees", "fish"], ["vehicles_2", "people"]]
    results: dict[int, dict] = {}
    app = create_app(pool, data_root, max_batch=64, max_wait_ms=400)
    calls = []
    run = served(pool)  # the modules the batcher runs: the pool's, BatchNorm folded (tests/test_request_cost.py)
    hooks = [run.library.register_forward_hook(lambda m, inp, out: calls.append(len(inp[0])))]
    rows = dict.fromkeys(pool.experts, 0)  # on a CPU each expert runs on the rows of its requests only
    for task in pool.experts:
        expert = run.expert(pool, task)

        def count(m, inp, out, t=task) -> None:
            rows[t] += len(inp[0])

        hooks.append(expert.register_forward_hook(count))
    try:
        with TestClient(app) as c:
            start = threading.Barrier(12)

            def one(i: int) -> None:
                start.wait()
                body = {"tasks": queries[i % 4], "images": [b64(encode(images[i % 8]))] * (1 + i % 2)}
                results[i] = c.post("/api/predict", json=body).json()

            threads = [threading.Thread(target=one, args=(i,)) for i in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            stats = c.get("/api/stats").json()
    finally:
        for hook in hooks:
            hook.remove()
    for i in range(12):
        same_predictions(results[i]["predictions"], expected(pool, queries[i % 4], [images[i % 8]] * (1 + i % 2)))
    assert rows == {t: sum(1 + i % 2 for i in range(12) if t in queries[i % 4]) for t in pool.experts}, rows
    assert stats["requests"] == 12 and stats["images"] == 18
    assert (stats["engine"], stats["engine_sessions"]) == ("torch", 0)  # create_app's default engine
    assert stats["forwards"] == len(calls) and sum(calls) == 18  # one library forward per batch, every row once
    assert stats["forwards"] <= 4 and stats["largest_batch_requests"] >= 4, stats  # 12 requests, at most 4 forwards


# ------------------------------------------------------------------ bad input
GIF = io.BytesIO()
Image.new("RGB", (32, 32)).save(GIF, "GIF")
BIG = np.zeros((64, 64, 3), np.uint8)
TASKS = "known tasks: aquatic_mammals, fish,"  # every task error lists what is accepted
JSON_Q = 'send JSON {"tasks": [TASK, ...], "evaluate": false}'
JSON_P = 'send JSON {"tasks": [TASK, ...], "images": [BASE64_PNG_OR_JPEG, ...]'
IMAGE = "accepted: PNG or JPEG"
JSON = {"content-type": "application/json"}

# (case, path, request, status, what the one-line error must say: what was wrong, what is accepted);
# "ok" / "cut" in images stand for a good PNG / a truncated PNG
BAD = [
    (
        "query unknown task",
        "/api/query",
        {"json": {"tasks": ["people", "unicorns"]}},
        400,
        ("unknown task 'unicorns'", TASKS),
    ),
    (
        "query repeated task",
        "/api/query",
        {"json": {"tasks": ["people", "people"]}},
        400,
        ("'people' is named twice", "name each task once"),
    ),
    ("query empty", "/api/query", {"json": {"tasks": []}}, 400, ("tasks: List should have at least 1 item", TASKS)),
    (
        "query malformed JSON",
        "/api/query",
        {"content": b'{"tasks": [', "headers": JSON},
        400,
        ("malformed JSON", JSON_Q, TASKS),
    ),
    (
        "query tasks not a list",
        "/api/query",
        {"json": {"tasks": "people"}},
        400,
        ("tasks: Input should be a valid list", JSON_Q),
    ),
    (
        "query evaluate not a bool",
        "/api/query",
        {"json": {"tasks": ["people"], "evaluate": "yes"}},
        400,
        ("evaluate: Input should be a valid boolean", JSON_Q),
    ),
    ("query not an object", "/api/query", {"json": [1, 2]}, 400, ("bad request: body", JSON_Q)),
    (
        "query unknown field",
        "/api/query",
        {"json": {"tasks": ["people"], "task": 1}},
        400,
        ("task: Extra inputs", JSON_Q),
    ),
    (
        "predict unknown task",
        "/api/predict",
        {"json": {"tasks": ["nope"], "images": ["ok"]}},
        400,
        ("unknown task 'nope'", TASKS),
    ),
    (
        "predict images not a list",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": "abc"}},
        400,
        ("images: Input should be a valid list", JSON_P),
    ),
    (
        "predict no images",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": []}},
        400,
        ("images: List should have at least 1 item", JSON_P),
    ),
    (
        "predict top not an int",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": ["ok"], "top": "3"}},
        400,
        ("top: Input should be a valid integer", JSON_P),
    ),
    (
        "predict top zero",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": ["ok"], "top": 0}},
        400,
        ("top: Input should be greater than or equal to 1", JSON_P),
    ),
    (
        "predict too many images",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": ["ok"] * (MAX_IMAGES + 1)}},
        413,
        (f"{MAX_IMAGES + 1} images in one request; at most {MAX_IMAGES}",),
    ),
    (
        "predict body over 8 MB",
        "/api/predict",
        {"content": b"x" * (8 * 2**20 + 1), "headers": JSON},
        413,
        ("over the limit of 8,388,608 bytes",),
    ),
    (
        "predict streamed body over 8 MB",
        "/api/predict",
        {"content": iter([b"x" * 2**20] * 9), "headers": JSON},
        413,
        ("over the limit of 8,388,608 bytes",),
    ),
    (
        "predict bad base64",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": ["ok", "%%%"]}},
        400,
        ("image 1 is not valid base64", "base64-encoded PNG or JPEG"),
    ),
    (
        "predict not an image",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": ["ok", b64(b"hello")]}},
        400,
        ("image 1 is not an image", IMAGE),
    ),
    (
        "predict truncated PNG",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": ["ok", "cut"]}},
        400,
        ("image 1 is corrupt or truncated", IMAGE),
    ),
    (
        "predict GIF",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": [b64(GIF.getvalue())]}},
        400,
        ("image 0 is GIF", IMAGE),
    ),
    (
        "predict wrong size",
        "/api/predict",
        {"json": {"tasks": ["people"], "images": [b64(encode(BIG))]}},
        400,
        ("image 0 is 64x64; this pool takes 32x32 RGB images",),
    ),
    (
        "upload without tasks",
        "/api/predict/upload",
        {"files": [("images", ("a.png", b"x", "image/png"))]},
        400,
        ("tasks: Field required", "multipart/form-data"),
    ),
    (
        "upload not an image",
        "/api/predict/upload",
        {"data": {"tasks": "people"}, "files": [("images", ("a.png", b"not an image", "image/png"))]},
        400,
        ("image 0 is not an image", IMAGE),
    ),
    (
        "upload unknown task",
        "/api/predict/upload",
        {"data": {"tasks": "people,ghosts"}, "files": [("images", ("a.png", b"x", "image/png"))]},
        400,
        ("unknown task 'ghosts'", TASKS),
    ),
]


@pytest.mark.parametrize("path,request_,status,says", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_one_line_error_and_the_server_goes_on(client, pool, images, path, request_, status, says):
    body = request_.get("json")
    if isinstance(body, dict) and isinstance(body.get("images"), list):
        swap = {"ok": b64(encode(images[0])), "cut": b64(encode(images[0])[:60])}
        request_ = {**request_, "json": {**body, "images": [swap.get(s, s) for s in body["images"]]}}
    r = client.post(path, **request_)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert "\n" not in error and "Traceback" not in error
    for part in says:
        assert part in error, error
    still_answers(client, pool, images)


@pytest.mark.parametrize(
    "url",
    [
        "/api/models/0123456789abcdef.pt2",
        "/api/models/..%2F..%2Fetc%2Fpasswd",
        "/api/models/%2e%2e/%2e%2e/etc/passwd",
        "/api/models/..%2Fserver.py",
        "/api/models/0123456789ABCDEF.pt2",
        "/api/models/",
        "/api/nothing",
    ],
)
def test_unknown_model_and_path_tricks_are_404(client, pool, images, url):
    r = client.get(url)
    assert r.status_code == 404, r.text
    assert "\n" not in r.json()["error"]
    still_answers(client, pool, images)


def test_port_in_use_is_a_one_line_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc = main_service(["--serve", "--port", str(port), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and "in use" in err[0]
