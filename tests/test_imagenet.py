"""ImageNet: the ImageFolder layout and its errors, and a tiny end-to-end pool on a generated folder.

The folder has all 1000 class folders (class id = sorted position, as on the real ImageNet) but images only in
those of the tasks used; the Oracle and MobileNetV2 weights are random stand-ins written by the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from PoE.cli import main_preprocessing, main_service
from PoE.core.datasets import get_dataset, load_split
from PoE.core.errors import PoEError
from PoE.core.networks import MobileNetExpert, MobileNetLibrary

CFG = get_dataset("imagenet")
WNIDS = [f"n{i:08d}" for i in range(1000)]  # sorted order = class id
TASKS = ["bird_etc1", "bird_passerine"]  # 10 + 11 classes
CLASSES = sorted(c for t in TASKS for c in CFG.tasks[t])


def write_jpeg(path: Path, rng: np.random.Generator, label: int) -> None:
    """A small non-square JPEG (the transforms resize it) whose colour depends on the label."""
    base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float64)
    img = np.clip(base + rng.normal(0, 30, (30, 40, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)


def make_imagenet(root: Path, classes: list[int], train: int = 2, val: int = 1) -> Path:
    """``root/imagenet/{train,val}/<wnid>/`` for all 1000 wnids; only ``classes`` get images."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train), ("val", val)):
        for c, w in enumerate(WNIDS):
            d = root / "imagenet" / split / w
            d.mkdir(parents=True)
            if c in classes:
                for i in range(per_class):
                    write_jpeg(d / f"{w}_{i}.JPEG", rng, c)
    return root


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory) -> Path:
    return make_imagenet(tmp_path_factory.mktemp("imagenet"), CLASSES)


@pytest.fixture(scope="module")
def stand_in_weights(tmp_path_factory) -> dict[str, Path]:
    """Random resnet18 (stand-in Oracle) and MobileNetV2 state dicts, as torchvision's weight files are."""
    d = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    out = {"oracle": d / "resnet18.pth", "library": d / "mobilenet_v2.pth"}
    torch.save(torchvision.models.resnet18().state_dict(), out["oracle"])
    torch.save(torchvision.models.mobilenet_v2().state_dict(), out["library"])
    return out


def test_reads_the_query_classes_of_the_val_folder(imagenet_root):
    test = load_split("imagenet", imagenet_root, "test", classes=CFG.tasks["bird_etc1"])
    assert test.x.shape == (10, 3, 224, 224) and test.x.dtype == torch.uint8  # resize 256, centre crop 224
    assert test.y.tolist() == list(range(87, 97))  # class id = position of the folder in sorted order


def test_errors_name_the_path_and_layout(tmp_path):
    with pytest.raises(PoEError, match=r"no image folder at .*imagenet; expected imagenet/ with train/<class>/"):
        load_split("imagenet", tmp_path, "test", classes=[10])
    val = tmp_path / "imagenet" / "val"
    val.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(val / "ILSVRC2012_val_00000001.JPEG")  # the raw, unsorted validation layout
    with pytest.raises(
        PoEError,
        match=r"val has 0 class folders, expected 1000 \(it holds images such as "
        r"ILSVRC2012_val_00000001.JPEG directly: sort them into class folders\); expected",
    ):
        load_split("imagenet", tmp_path, "test", classes=[10])
    for w in WNIDS:
        (val / w).mkdir()
    with pytest.raises(PoEError, match=r"no images in .*n00000010 \(class 10\); expected imagenet/"):
        load_split("imagenet", tmp_path, "test", classes=[10])


def test_preprocessing_errors_are_one_line(tmp_path, capsys, stand_in_weights, monkeypatch):
    root = tmp_path / "data"
    (root / "imagenet" / "val").mkdir(parents=True)
    base = [
        "--dataset",
        "imagenet",
        "--data_root",
        str(root),
        "--db",
        str(tmp_path / "db"),
        "--pretrained",
        str(tmp_path / "pre"),
        "--tasks",
        "bird_etc1",
        "--no_progress",
        "--device",
        "cpu",
    ]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty hub cache
    assert main_preprocessing(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ImageNet weights for wide_resnet101_2 at " in err[0]
    assert "torch_home/hub/checkpoints/wide_resnet101_2-32ee1156.pth" in err[0] and "--oracle_weights" in err[0]
    stand_in = ["--oracle_arch", "resnet18", "--oracle_weights", str(stand_in_weights["oracle"])]
    assert main_preprocessing([*base, *stand_in]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val has 0 class folders, expected 1000" in err[0]
    assert main_preprocessing([*base, *stand_in, "--teacher_views", "2"]) == 2
    assert "--teacher_views must be 0 for imagenet" in capsys.readouterr().err


def test_end_to_end_tiny_pool_and_service(tmp_path, imagenet_root, stand_in_weights, capsys):
    db, pre = tmp_path / "DB_PoE", tmp_path / "DB_pretrained"
    rc = main_preprocessing(
        [
            "--dataset",
            "imagenet",
            "--data_root",
            str(imagenet_root),
            "--profile",
            "quick",
            "--oracle_arch",
            "resnet18",
            "--oracle_weights",
            str(stand_in_weights["oracle"]),
            "--library_weights",
            str(stand_in_weights["library"]),
            "--epochs",
            "1",
            "--batch_size",
            "8",
            "--workers",
            "2",
            "--tasks",
            *TASKS,
            "--db",
            str(db),
            "--pretrained",
            str(pre),
            "--no_progress",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "Oracle (resnet18, pretrained)" in out and "[experts] epoch 1/1" in out
    pool = db / "imagenet"
    lib = torch.load(pool / "library_ImageNet.pt", weights_only=True)
    full = torch.load(stand_in_weights["library"], weights_only=True)
    assert torch.equal(lib["state_dict"]["features.17.conv.2.weight"], full["features.17.conv.2.weight"])
    assert {p.name for p in (pool / "experts").iterdir()} == {f"expert_{t}.pt" for t in TASKS}
    manifest = json.loads((pool / "manifest.json").read_text())
    assert set(manifest["experts"]) == set(TASKS) and manifest["experts"]["bird_etc1"]["test_n"] == 10

    assert (
        main_service(
            [
                "--dataset",
                "imagenet",
                "--db",
                str(db),
                "--data_root",
                str(imagenet_root),
                "--queriedTask",
                *TASKS,
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["n_test"] == 21 and 0.0 <= r["accuracy"] <= 100.0
    library = sum(p.numel() for p in MobileNetLibrary().parameters())
    experts = sum(p.numel() for n in (10, 11) for p in MobileNetExpert(320, CFG.networks.expert_width, n).parameters())
    assert library == 1_811_712 and r["params"] == library + experts  # about 1.87M, as the paper's 1.86M
    assert 0.28e9 < r["flops"] < 0.29e9  # multiply-adds of conv + linear at 224 x 224


def test_paper_schedule_and_model_cost():
    from PoE.build.profiles import for_dataset, get_profile
    from PoE.core.evaluate import count_params
    from PoE.core.networks.mobilenetv2 import new_expert
    from PoE.core.query import make_query

    from .conftest import consolidated

    prof = for_dataset(get_profile("paper"), CFG)
    assert prof.oracle_arch is None and prof.teacher_views == 0  # the pretrained Oracle, on every batch
    e = prof.experts
    assert (e.epochs, e.lr, e.batch_size) == (20, 0.01, 512)
    assert [e.lr_at(x) for x in (9.9, 10, 14.9, 15)] == pytest.approx([0.01, 0.001, 0.001, 0.0001])
    lib = MobileNetLibrary()
    sizes = []
    for tasks in (["bird_passerine"], ["bird_passerine", "bird_aquatic2"], CFG.default_tasks[:3]):
        experts = [new_expert(lib, CFG.networks.expert_width, len(CFG.tasks[t])) for t in tasks]
        sizes.append(round(count_params(consolidated(lib, experts, make_query(tasks, CFG.tasks))) / 1e6, 2))
    assert sizes == [1.84, 1.87, 1.89]  # the paper: 1.84M, 1.86M, 1.89M
