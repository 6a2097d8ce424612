"""Tiny-ImageNet: the distributed folder layout, its errors, a tiny end-to-end pool, and the original release."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from PoE.cli import main_preprocessing, main_service
from PoE.core.datasets import get_dataset, load_split
from PoE.core.errors import PoEError

from .conftest import need, shared_dir

CFG = get_dataset("tinyimagenet")
WNIDS = [f"n{i:08d}" for i in range(200)]  # sorted order = class index


def write_jpeg(path: Path, rng: np.random.Generator, label: int, size: int = 64) -> None:
    """A JPEG whose colour depends on the label, so a tiny model can learn something."""
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float64)
    img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def make_tiny_imagenet(root: Path, per_class: int = 3, val_per_class: int = 2, classes: int = 200) -> Path:
    """A Tiny-ImageNet folder in the distributed layout (train/<wnid>/images, val/images + annotations)."""
    folder = root / "tiny-imagenet-200"
    rng = np.random.default_rng(0)
    (folder).mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(WNIDS)) + "\n")  # file order is not class order
    lines = []
    for c in range(classes):
        w = WNIDS[c]
        for i in range(per_class):
            write_jpeg(folder / "train" / w / "images" / f"{w}_{i}.JPEG", rng, c)
        for _ in range(val_per_class):
            name = f"val_{len(lines)}.JPEG"
            write_jpeg(folder / "val" / "images" / name, rng, c)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return make_tiny_imagenet(tmp_path_factory.mktemp("tin"))


def test_reads_the_distributed_layout(tiny_root):
    train = load_split("tinyimagenet", tiny_root, "train")
    test = load_split("tinyimagenet", tiny_root, "test")
    assert train.x.shape == (600, 3, 64, 64) and test.x.shape == (400, 3, 64, 64)
    assert train.y.tolist() == [c for c in range(200) for _ in range(3)]  # class = sorted-wnid position
    assert test.y.tolist() == [c for c in range(200) for _ in range(2)]  # annotation order
    again = load_split("tinyimagenet", tiny_root, "test")  # served from the decoded cache
    assert bool((again.x == test.x).all())


def test_errors_name_the_path_and_layout(tmp_path, tiny_root):
    with pytest.raises(PoEError, match=r"no Tiny-ImageNet folder at .*expected tiny-imagenet-200/ as distributed"):
        load_split("tinyimagenet", tmp_path, "test")
    bad = make_tiny_imagenet(tmp_path / "bad", per_class=1, val_per_class=1, classes=200)
    ann = bad / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text(ann.read_text() + "val_x.JPEG n99999999\t0\n")
    with pytest.raises(PoEError, match=r"val_annotations.txt line 201 is not 'file<TAB>wnid<TAB>box'"):
        load_split("tinyimagenet", bad, "test")
    small = make_tiny_imagenet(tmp_path / "small", per_class=1, val_per_class=1, classes=200)
    Image.new("RGB", (32, 32)).save(small / "tiny-imagenet-200" / "val" / "images" / "val_0.JPEG")
    with pytest.raises(PoEError, match=r"val_0.JPEG is 32x32, expected 64x64"):
        load_split("tinyimagenet", small, "test")


def test_folder_without_train_serves_evaluation_only(tmp_path, capsys):
    root = make_tiny_imagenet(tmp_path, per_class=1, val_per_class=1)
    import shutil

    shutil.rmtree(root / "tiny-imagenet-200" / "train")
    assert len(load_split("tinyimagenet", root, "test")) == 200
    rc = main_preprocessing(
        [
            "--dataset",
            "tinyimagenet",
            "--data_root",
            str(root),
            "--profile",
            "quick",
            "--db",
            str(tmp_path / "db"),
            "--pretrained",
            str(tmp_path / "pre"),
            "--no_progress",
            "--device",
            "cpu",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "no Tiny-ImageNet training images" in err[0] and "serves evaluation only" in err[0]
    assert not (tmp_path / "db").exists() or not any((tmp_path / "db").rglob("*.pt"))


def test_end_to_end_tiny_pool_and_service(tmp_path, tiny_root, capsys):
    db, pre = tmp_path / "DB_PoE", tmp_path / "DB_pretrained"
    rc = main_preprocessing(
        [
            "--dataset",
            "tinyimagenet",
            "--data_root",
            str(tiny_root),
            "--profile",
            "quick",
            "--epochs",
            "1",
            "--batch_size",
            "64",
            "--tasks",
            "arachnid",
            "canine",
            "--db",
            str(db),
            "--pretrained",
            str(pre),
            "--no_progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    pool = db / "tinyimagenet"
    assert (pool / "library_TinyImageNet.pt").is_file()
    assert {p.name for p in (pool / "experts").iterdir()} == {"expert_arachnid.pt", "expert_canine.pt"}
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["dataset"] == "tinyimagenet" and len(manifest["train_data_sha256"]) == 64
    capsys.readouterr()
    assert (
        main_service(
            [
                "--dataset",
                "tinyimagenet",
                "--db",
                str(db),
                "--data_root",
                str(tiny_root),
                "--queriedTask",
                "canine",
                "arachnid",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["n_test"] == 20  # 10 classes x 2 validation images
    assert 0.0 <= r["accuracy"] <= 100.0


@pytest.fixture(scope="module")
def real_val() -> Path:
    need(shared_dir() / "data" / "tiny-imagenet-200" / "val" / "val_annotations.txt")
    return shared_dir() / "data"


def test_reproduces_the_original_release_on_real_validation(capsys, real_val):
    official = need(shared_dir() / "official" / "tinyimagenet")
    argv = [
        "--dataset",
        "tinyimagenet",
        "--db",
        str(official),
        "--data_root",
        str(real_val),
        "--queriedTask",
        "arachnid",
        "canine",
        "feline",
        "--json",
        "--device",
        "cpu",
    ]
    assert main_service(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["n_test"] == 750
    assert r["accuracy"] == pytest.approx(65.87, abs=0.2)  # the original code's number (PIL decoding)
    test = load_split("tinyimagenet", real_val, "test")
    assert len(test) == 10000 and test.y.bincount().tolist() == [50] * 200
