"""The HTTP service under hostile conditions: a batching window that could hold requests forever is refused,
test data that cannot be used never gives a 500, a full disk never kills the server, the OpenAPI schema lists
every refusal, and model ids are the same from any worker (content, not process, decides them)."""

from __future__ import annotations

import errno
import io
import math
import zipfile

import numpy as np
import pytest
import torch

from PoE.core.errors import PoEError
from PoE.query.pool import BANK_CACHE, Pool
from PoE.query.service import create_app
from PoE.query.service.limits import LRU, MAX_EXPORT_BYTES

from .api import QUERY, TestClient, b64, encode, still_answers
from .conftest import ROOT


@pytest.fixture(scope="module")
def images(data_root) -> np.ndarray:
    return np.load(data_root / "cifar100" / "test.npz")["x"][:4]


@pytest.mark.parametrize("wait", [math.inf, math.nan, -1.0, 1e6, "5"])
def test_a_batching_window_that_could_hang_is_refused(pool, wait):
    with pytest.raises(PoEError, match="batch wait must be a number of milliseconds from 0 to 1000"):
        create_app(pool, max_wait_ms=wait)


def test_a_batch_size_below_one_is_refused(pool):
    with pytest.raises(PoEError, match="max_batch must be a whole number of images, 1 or more"):
        create_app(pool, max_batch=0)


def fake_npz(path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)


def huge_header_npz(path) -> None:
    """1.5 KB whose x header claims 10^9 images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 32, 32, 3)})
    y = io.BytesIO()
    np.save(y, np.zeros(10**9 // 10**6, np.int64))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", head.getvalue() + bytes(1024))
        z.writestr("y.npy", y.getvalue())


def unusable(kind: str, root, real) -> None:
    path = root / "cifar100" / "test.npz"
    x, y = real["x"], real["y"]
    people = [2, 11, 35, 46, 98]
    if kind == "no images of the query's classes":
        keep = ~np.isin(y, people)
        fake_npz(path, x[keep][:200], y[keep][:200])
    elif kind == "one label":
        fake_npz(path, x[:50], np.zeros(50, np.int64))
    elif kind == "huge header":
        huge_header_npz(path)
    elif kind == "not an npz":
        path.parent.mkdir(parents=True)
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif kind == "labels out of range":
        fake_npz(path, x[:50], np.full(50, 1000, np.int64))


@pytest.mark.parametrize(
    "kind,status",
    [
        ("no images of the query's classes", 422),
        ("one label", 422),
        ("huge header", 503),
        ("not an npz", 503),
        ("labels out of range", 503),
    ],
)
def test_evaluate_over_unusable_test_data_is_never_a_500(pool, data_root, images, tmp_path, kind, status):
    unusable(kind, tmp_path, np.load(data_root / "cifar100" / "test.npz"))
    with TestClient(create_app(pool, tmp_path)) as client:
        r = client.post("/api/query", json={"tasks": ["people"], "evaluate": True})
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert "\n" not in error and "Traceback" not in error
        assert "accuracy is unavailable" in error or "has no images of this query's class" in error, error
        assert client.post("/api/query", json={"tasks": ["people"]}).status_code == 200
        still_answers(client, pool, images)


def test_a_full_disk_on_export_is_a_507_and_the_server_goes_on(pool, images, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with TestClient(create_app(pool)) as client:
        url = client.post("/api/query", json={"tasks": ["people"]}).json()["model"]
        monkeypatch.setattr(torch.export, "save", full)
        r = client.get(url)
        assert r.status_code == 507 and "no space left" in r.json()["error"], r.text
        monkeypatch.undo()
        assert client.get(url).status_code == 200  # nothing was cached from the failed export
        still_answers(client, pool, images)


def test_model_ids_are_the_same_from_any_worker_and_forgeries_are_404(pool, images, tmp_path):
    """Two apps over two separately opened pools: a model URL from one downloads from the other, which never
    saw the query; the program gives the model's logits. A changed digest or task code is a 404."""
    other = Pool.open(ROOT / "DB_PoE", "cifar100", device="cpu", precision="fp32")
    tasks = ["vehicles_1", "people"]
    with TestClient(create_app(pool)) as a, TestClient(create_app(other)) as b:
        url = a.post("/api/query", json={"tasks": tasks}).json()["model"]
        assert b.post("/api/query", json={"tasks": tasks}).json()["model"] == url
        assert a.post("/api/query", json={"tasks": tasks[::-1]}).json()["model"] != url
        r = b.get(url)
        assert r.status_code == 200 and 'filename="poe_vehicles_1__people.pt2"' in r.headers["content-disposition"]
        (tmp_path / "m.pt2").write_bytes(r.content)
        program = torch.export.load(str(tmp_path / "m.pt2")).module()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(program(x), pool.query(tasks).logits(images), rtol=1e-4, atol=1e-4)
        digest, codes = url.removeprefix("/api/models/").removesuffix(".pt2").split("-")
        forged = [f"{'0' * 16}-{codes}", f"{digest}-{codes[2:]}{codes[:2]}", f"{digest}-{codes}ff", f"{digest}-"]
        for name in forged:
            assert b.get(f"/api/models/{name}.pt2").status_code == 404, name


def test_openapi_lists_every_refusal_and_the_bounds(pool):
    with TestClient(create_app(pool)) as client:
        schema = client.get("/openapi.json").json()
    paths, bodies = schema["paths"], schema["components"]["schemas"]
    assert {"400", "413"} <= set(paths["/api/predict"]["post"]["responses"])
    assert {"400", "413", "422", "503"} <= set(paths["/api/query"]["post"]["responses"])
    assert {"404", "507"} <= set(paths["/api/models/{name}"]["get"]["responses"])
    assert bodies["QueryBody"]["properties"]["tasks"]["minItems"] == 1
    assert bodies["QueryBody"]["properties"]["tasks"]["items"]["enum"] == list(pool.cfg.tasks)
    assert bodies["PredictBody"]["properties"]["images"]["minItems"] == 1
    assert bodies["PredictBody"]["properties"]["top"]["minimum"] == 1


def test_predictions_of_many_images_decode_off_the_event_loop_and_match(pool, images):
    with TestClient(create_app(pool)) as client:
        r = client.post("/api/predict", json={"tasks": QUERY, "images": [b64(encode(im)) for im in images], "top": 3})
    assert r.status_code == 200, r.text
    pred = pool.query(QUERY).predict(images)
    assert [p["class_id"] for p in r.json()["predictions"]] == pred.class_ids
    got, want = [p["top"] for p in r.json()["predictions"]], [pred.top(i, 3) for i in range(len(images))]
    assert [[c["id"] for c in g] for g in got] == [[c["id"] for c in w] for w in want]
    # the server runs the modules with BatchNorm folded (tests/test_request_cost.py): the last digit may differ
    probs = [c["probability"] for g in got for c in g]
    assert probs == pytest.approx([c["probability"] for w in want for c in w], abs=2e-6)


@pytest.mark.parametrize(
    "workers,threads,cpus,want",
    [
        (None, None, 2, (1, 1)),
        (None, None, 16, (8, 1)),
        (1, None, 16, (1, 4)),
        (2, None, 2, (2, 1)),
        (None, 3, 16, (8, 3)),
        (None, None, 1, (1, 1)),
    ],
)
def test_workers_and_threads_follow_the_cores(workers, threads, cpus, want):
    """One worker per two cores; a worker's forwards get its share of the cores less one, 1 to 4 threads."""
    from PoE.query.service.run import plan

    assert plan(workers, threads, cpus) == want


@pytest.mark.parametrize(
    "argv,says",
    [
        (["--replicas", "2"], "--replicas and --ray_address go with --ray"),
        (["--ray_address", "auto"], "--replicas and --ray_address go with --ray"),
        (["--ray", "--workers", "2"], "with --ray use --replicas N"),
    ],
)
def test_serve_flags_that_do_not_go_together_are_one_line(capsys, argv, says):
    from PoE.cli import main_service

    assert main_service(["--serve", "--device", "cpu", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], err


def test_every_cache_is_bounded_and_stats_says_by_what(pool, data_root):
    """Memory above the pool grows only by the caches, each bounded: /api/stats gives each one's fill and bound,
    and more distinct queries than a bound leave the cache at its bound (least recently used dropped)."""
    app = create_app(pool, data_root)
    app.state.service.view.built = LRU(4)
    tasks = list(pool.experts)
    with TestClient(app) as c:
        for i in range(7):  # 7 distinct task lists through a 4-entry cache
            r = c.post(
                "/api/predict",
                json={"tasks": tasks[i : i + 2], "images": [b64(encode(np.zeros((32, 32, 3), np.uint8)))]},
            )
            assert r.status_code == 200, r.text
        caches = c.get("/api/stats").json()["caches"]
    assert caches["models"] == {"entries": 4, "bound_entries": 4}
    assert caches["accuracies"]["bound_entries"] == 4096 and caches["exports"]["bound_bytes"] == MAX_EXPORT_BYTES
    assert caches["banks"]["entries"] <= caches["banks"]["bound_entries"] == BANK_CACHE


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: what a decompression bomb shows first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_huge_declared_images_are_refused_as_too_large_without_a_warning(pool, recwarn):
    """20000 x 20000 was called "corrupt or truncated" (PIL's bomb error); 13000 x 13000 was refused by its size
    but PIL's DecompressionBombWarning reached the server's log. Both: too large, one line, no warning."""
    with TestClient(create_app(pool, None)) as client:
        for side in (20000, 13000):
            r = client.post("/api/predict", json={"tasks": QUERY, "images": [b64(png_header(side, side))]})
            assert r.status_code == 400
            error = r.json()["error"]
            assert "corrupt" not in error and ("far larger than 32x32" in error or f"is {side}x{side}" in error), error
    assert not [w for w in recwarn if "DecompressionBomb" in type(w.message).__name__], [str(w) for w in recwarn]
