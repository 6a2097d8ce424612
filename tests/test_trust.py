"""What a pool's answers depend on is checked before it answers, and a user can pin the pool itself: a bare pool
(the original release) answers with its dataset's own tasks, not a hierarchy file put beside it; a folder pool's
``dataset.json`` (class names, image size) is in the manifest's file table; every file listed there is checked by
size and SHA-256 before torch reads it, and a zip declaring gigabytes is refused before it is inflated; the root
digest shown by ``--list`` and every JSON result pins one pool (``--pool_digest``, ``Pool.open(expected_digest=)``).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from PoE.build.migrate import main as migrate
from PoE.cli import main_preprocessing, main_service
from PoE.core.errors import PoEError
from PoE.query.pool import Pool
from PoE.query.service import create_app

from .conftest import ROOT, rewrite_part

with warnings.catch_warnings():  # Starlette >= 1.x prefers httpx2 for its TestClient; httpx still works
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

FOLDER_CLASSES = {0: "apple", 19: "cattle", 30: "dolphin"}  # CIFAR-100 ids -> the folder's class folders
TASKS = {"farm": ["apple", "cattle"], "sea": ["dolphin"]}  # a swap inside a task keeps the hierarchy's hash


def one_line_refusal(capsys, rc: int, *match: str) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert all(m in err for m in match), err
    return err


def refused(*args, match: tuple[str, ...] = (), **kwargs) -> str:
    with pytest.raises(PoEError) as e:
        Pool.open(*args, **kwargs)
    line = str(e.value)
    assert "\n" not in line and all(m in line for m in match), line
    return line


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory, data_root) -> dict[str, Path]:
    """A folder dataset of three real CIFAR-100 classes (40 train, 20 test PNGs each) and a pool built from it
    (an Oracle trained here for one epoch: the files, not the accuracy, are under test)."""
    from PIL import Image

    base = tmp_path_factory.mktemp("folder_pool")
    images = base / "images"
    with np.load(data_root / "cifar100" / "test.npz") as z:
        x, y = z["x"], z["y"]
    for c, name in FOLDER_CLASSES.items():
        idx = np.flatnonzero(y == c)
        for split, part in (("train", idx[:40]), ("test", idx[40:60])):
            (images / split / name).mkdir(parents=True)
            for i in part:
                Image.fromarray(x[i]).save(images / split / name / f"{i}.png")
    (base / "tasks.json").write_text(json.dumps(TASKS))
    argv = [
        "--dataset",
        "folder",
        "--data_root",
        str(images),
        "--db",
        str(base / "db"),
        "--pretrained",
        str(base / "pre"),
        "--hierarchy",
        str(base / "tasks.json"),
        "--profile",
        "quick",
        "--oracle_arch",
        "wrn-10-1",
        "--epochs",
        "1",
        "--teacher_views",
        "1",
        "--no_progress",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    assert main_preprocessing(argv) == 0
    return {"db": base / "db", "images": images}


@pytest.fixture
def folder_pool(folder_build, tmp_path) -> Path:
    """A writable copy of the folder pool; returns the pool folder (``tmp/db/folder``)."""
    shutil.copytree(folder_build["db"] / "folder", tmp_path / "db" / "folder")
    return tmp_path / "db" / "folder"


def apples(folder_build) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted((folder_build["images"] / "test" / "apple").iterdir())]


def test_a_hierarchy_file_beside_a_bare_pool_is_refused_unless_named(tmp_path, official_cifar, capsys):
    """The original release with a hierarchy.json that swaps people's and vehicles_1's classes answered the README
    query at 30.6% instead of 76.13%, and `people` with bicycle..train, exit 0."""
    from PoE.core.datasets import get_dataset

    pool = tmp_path / "official"
    shutil.copytree(official_cifar, pool)
    cifar = get_dataset("cifar100")
    names = {t: [cifar.class_name(c) for c in cls] for t, cls in cifar.tasks.items()}
    names["people"], names["vehicles_1"] = names["vehicles_1"], names["people"]
    from PoE.core.tasks import Hierarchy

    swapped: Hierarchy = Hierarchy.parse(names, cifar, "swapped")
    (pool / "hierarchy.json").write_text(json.dumps({"dataset": "cifar100", **swapped.record(cifar)}))
    refused(pool, match=("has no manifest.json", "hierarchy.json", "built-in ones", "--hierarchy"))
    rc = main_service(["--db", str(pool), "--queriedTask", "people", "--no_eval", "--device", "cpu"])
    one_line_refusal(capsys, rc, "nothing vouches for")
    # named by the user, it is the user's choice
    chosen = Pool.open(pool, hierarchy=pool / "hierarchy.json")
    assert chosen.query(["people"]).class_names == ["bicycle", "bus", "motorcycle", "pickup_truck", "train"]
    (pool / "hierarchy.json").unlink()
    assert Pool.open(pool).query(["people"]).class_names == ["baby", "boy", "girl", "man", "woman"]


@pytest.mark.parametrize(
    "change",
    [
        lambda d: {**d, "class_names": ["cattle", "apple", "dolphin"]},  # two names swapped: apples called cattle
        lambda d: {**d, "image_size": 40},  # another image size: other FLOPs, resized inputs
    ],
)
def test_a_changed_dataset_json_is_refused(folder_build, folder_pool, capsys, change):
    good = Pool.open(folder_pool, "folder")
    assert good.query(["farm", "sea"]).class_names == ["apple", "cattle", "dolphin"]
    desc = folder_pool / "dataset.json"
    desc.write_text(json.dumps(change(json.loads(desc.read_text()))))
    refused(folder_pool, "folder", match=("dataset.json", "replaced or changed after the manifest was written"))
    rc = main_service(["--dataset", "folder", "--db", str(folder_pool.parent), "--list"])
    one_line_refusal(capsys, rc, "dataset.json")
    desc.unlink()
    refused(folder_pool, "folder", match=("lists dataset.json, which is missing",))


def test_a_folder_pool_of_the_previous_format_is_upgraded_to_cover_dataset_json(folder_build, folder_pool, capsys):
    """A format-3 manifest records no file hashes: a folder pool (whose dataset.json nothing covered) is refused
    with the command that records it; a built-in dataset's pool of that format opens as before."""
    manifest = json.loads((folder_pool / "manifest.json").read_text())
    assert manifest["manifest_format"] == 4 and "dataset.json" in manifest["files"]
    old = {k: v for k, v in manifest.items() if k != "files"} | {"manifest_format": 3}
    (folder_pool / "manifest.json").write_text(json.dumps(old))
    refused(folder_pool, "folder", match=("does not cover", "dataset.json", "python -m PoE.build.migrate"))
    assert migrate([str(folder_pool), "--dataset", "folder"]) == 0
    assert "dataset.json recorded as it is now" in capsys.readouterr().out
    assert Pool.open(folder_pool, "folder").digest == Pool.open(folder_build["db"], "folder").digest
    assert json.loads((ROOT / "DB_PoE" / "cifar100" / "manifest.json").read_text())["manifest_format"] == 3
    assert Pool.open(ROOT / "DB_PoE").notes == []


def zip_bomb(path: Path, mib: int) -> None:
    """A deflate zip of ``mib`` MiB of zeros (a few hundred KB on disk)."""
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z, z.open("archive/data.pkl", "w") as f:
        for _ in range(mib):
            f.write(chunk)


def test_a_zip_bomb_in_place_of_an_expert_is_refused_before_it_is_inflated(tmp_path, folder_pool, monkeypatch):
    """An expert replaced by a 2.9 MB deflate bomb (3 GB of zeros) was refused only after 65 s and 6.5 GB: it was
    inflated before anything checked it. Listed files are checked by size before they are read; any zip whose
    declared sizes a checkpoint of its size cannot hold is refused before torch sees it."""
    loaded = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda source, *a, **k: loaded.append(source) or real_load(source, *a, **k))
    shipped = tmp_path / "shipped"
    shutil.copytree(ROOT / "DB_PoE", shipped)  # manifest format 3: no file sizes recorded
    bomb = shipped / "cifar100" / "experts" / "expert_people.pt"
    zip_bomb(bomb, 256)
    t0 = time.perf_counter()
    refused(shipped, match=(str(bomb), "decompression bomb", "refused before loading it"))
    assert time.perf_counter() - t0 < 20 and bomb not in loaded  # the people expert was never handed to torch
    bomb = folder_pool / "experts" / "expert_farm.pt"  # format 4: its size is recorded
    zip_bomb(bomb, 16)
    loaded.clear()
    refused(folder_pool, "folder", match=(str(bomb), "bytes, but", "manifest.json lists it at"))
    assert len(loaded) == 1  # the library only: the bomb was refused by its size, unread


def test_a_listed_file_changed_behind_the_manifest_is_refused_before_it_is_read(folder_pool):
    path = folder_pool / "experts" / "expert_farm.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1  # same size, one bit
    path.write_bytes(bytes(data))
    refused(folder_pool, "folder", match=(str(path), "its SHA-256 does not match"))


def test_the_root_digest_pins_the_pool(folder_build, folder_pool, capsys, official_cifar):
    """A consistent rewrite (an expert changed, its digests recomputed and listed in the manifest) opens: the
    manifest cannot tell it from a new build. The digest can: a pinned open refuses it."""
    db = str(folder_pool.parent)
    pool = Pool.open(folder_pool, "folder")
    digest = pool.digest
    assert len(digest) == 64 and pool.describe()["pool_digest"] == digest
    assert Pool.open(folder_pool, "folder", expected_digest=digest.upper()).digest == digest  # as --list shows it
    assert main_service(["--dataset", "folder", "--db", db, "--list"]) == 0
    assert f"pool digest {digest}" in capsys.readouterr().out
    argv = ["--dataset", "folder", "--db", db, "--queriedTask", "farm", "--no_eval", "--json", "--device", "cpu"]
    assert main_service([*argv, "--pool_digest", digest]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pool_digest"] == digest
    with TestClient(create_app(pool)) as client:
        assert client.get("/api/pool").json()["pool_digest"] == digest
        assert client.post("/api/query", json={"tasks": ["farm"]}).json()["pool_digest"] == digest

    rewrite_part(folder_pool / "experts" / "expert_farm.pt", lambda obj: obj.update(test_acc=99.0))  # the forger
    assert Pool.open(folder_pool, "folder").digest != digest  # it opens (a consistent edit is a new pool) ...
    refused(folder_pool, "folder", expected_digest=digest, match=(f"not the pinned {digest}", "--pool_digest"))
    one_line_refusal(capsys, main_service([*argv, "--pool_digest", digest]), "not the pinned")  # ... unless pinned
    one_line_refusal(capsys, main_service([*argv, "--pool_digest", "12ab"]), "expected the pool's 64 hex digits")
    with TestClient(create_app(pool)) as client:  # a server opened before the change follows it ...
        assert client.get("/api/pool").json()["pool_digest"] not in (digest, None)
    served = folder_pool.parent.parent / "served"
    shutil.copytree(folder_build["db"] / "folder", served / "folder")
    with TestClient(create_app(Pool.open(served, "folder", expected_digest=digest))) as client:
        assert client.get("/api/pool").json()["pool_digest"] == digest
        rewrite_part(served / "folder" / "experts" / "expert_farm.pt", lambda obj: obj.update(test_acc=1.0))
        assert Pool.open(served, "folder").digest != digest
        assert client.get("/api/pool").json()["pool_digest"] == digest  # ... a pinned one keeps the pinned pool
    bare = Pool.open(official_cifar).digest  # a bare pool has a digest too: over its files' hashes
    assert len(bare) == 64 and Pool.open(official_cifar, expected_digest=bare).digest == bare
