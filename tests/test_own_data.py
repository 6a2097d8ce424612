"""Your own data and Oracle on real images: CIFAR-100 test images written as an ImageFolder of PNGs with a
hierarchy that is not the superclasses, an exported Oracle, Tiny-ImageNet's validation images as a folder with
readable class names, and unreadable images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from PoE.cli import main_preprocessing, main_service
from PoE.datasets import get_dataset
from PoE.datasets.cifar100 import CLASSES as CIFAR_NAMES
from PoE.datasets.tinyimagenet import class_names as tiny_names

from .conftest import need, official_student, shared_dir

CLASSES = [0, 8, 17, 30, 48, 85]  # apple, bicycle, castle, dolphin, motorcycle, tank: folder ids 0..5
OWN = {"fruit_and_wheels": ["apple", "bicycle", "motorcycle"], "big": ["castle", "tank"], "sea": ["dolphin"]}
FAST = ["--profile", "quick", "--epochs", "1", "--teacher_views", "1", "--no_progress", "--device", "cpu",
        "--precision", "fp32"]  # fmt: skip


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory, data_root) -> Path:
    """Six CIFAR-100 classes' test images as PNGs: 80 per class in train/, 20 in test/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("cifar_png")
    with np.load(data_root / "cifar100" / "test.npz") as z:
        x, y = z["x"], z["y"]
    for c in CLASSES:
        idx = np.flatnonzero(y == c)
        for split, part in (("train", idx[:80]), ("test", idx[80:])):
            (root / split / CIFAR_NAMES[c]).mkdir(parents=True)
            for i in part:
                Image.fromarray(x[i]).save(root / split / CIFAR_NAMES[c] / f"{i}.png")
    (root / "tasks.json").write_text(json.dumps(OWN))
    return root


class CifarSix(nn.Module):
    """The original release's WRN-16-1 on [0, 1] RGB, scoring the folder's six classes in the ``order`` given."""

    def __init__(self, net: nn.Module, order: list[int]) -> None:
        super().__init__()
        cfg = get_dataset("cifar100")
        self.net = net
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))
        self.register_buffer("cols", torch.tensor([CLASSES[i] for i in order]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)[:, self.cols]


@pytest.fixture(scope="module")
def oracles(tmp_path_factory, official_cifar) -> dict[str, Path]:
    """The stand-in Oracle exported with torch.export (folder order), and as TorchScript in reversed order."""
    out = tmp_path_factory.mktemp("oracles")
    net = official_student(official_cifar)
    program = torch.export.export(CifarSix(net, list(range(6))).eval(), (torch.rand(2, 3, 32, 32),),
                                  dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},))  # fmt: skip
    torch.export.save(program, out / "oracle.pt2")
    reverse = list(reversed(range(6)))
    torch.jit.trace(CifarSix(net, reverse).eval(), torch.rand(2, 3, 32, 32)).save(str(out / "reversed.ts"))
    (out / "reversed.txt").write_text("\n".join(CIFAR_NAMES[CLASSES[i]] for i in reverse) + "\n")
    torch.jit.trace(nn.Flatten(), torch.rand(2, 3, 32, 32)).save(str(out / "wrong_shape.ts"))
    (out / "garbage.pt2").write_bytes(b"not a program")
    return out


def build(folder: Path, tmp: Path, *extra: str) -> tuple[int, list[str]]:
    argv = ["--dataset", "folder", "--data_root", str(folder), "--db", str(tmp / "db"), "--pretrained",
            str(tmp / "pre"), "--hierarchy", str(folder / "tasks.json"), *FAST, *extra]  # fmt: skip
    return main_preprocessing(argv), argv


def test_folder_pool_with_an_exported_oracle(cifar_folder, oracles, tmp_path, capsys):
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / "oracle.pt2"))
    out = capsys.readouterr().out
    assert rc == 0, out
    row = next(line for line in out.splitlines() if line.startswith("Oracle ("))
    acc = float(row.split()[-3])
    assert 75.0 < acc <= 100.0 and row.split()[-2] == "120"  # the real network on 6 real classes' test images
    assert "expert fruit_and_wheels" in out and "[oracle] epoch" not in out  # the Oracle was not trained
    pool = tmp_path / "db" / "folder"
    assert json.loads((pool / "dataset.json").read_text())["class_names"][:2] == ["apple", "bicycle"]
    # the pool opens and lists without the images; queries read the folder's test images
    assert main_service(["--dataset", "folder", "--db", str(tmp_path / "db"), "--list"]) == 0
    assert "4 motorcycle" in capsys.readouterr().out
    argv = ["--dataset", "folder", "--db", str(tmp_path / "db"), "--data_root", str(cifar_folder), "--json",
            "--queriedTask", "sea", "big", "--device", "cpu"]  # fmt: skip
    assert main_service(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["class_names"] == ["castle", "dolphin", "tank"] and result["n_test"] == 60

    # the same Oracle as TorchScript with its outputs reversed, and the file that says so: the same accuracy
    rc, _ = build(cifar_folder, tmp_path / "ts", "--oracle", str(oracles / "reversed.ts"), "--oracle_classes",
                  str(oracles / "reversed.txt"), "--stages", "oracle")  # fmt: skip
    ts_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Oracle ("))
    assert rc == 0 and float(ts_row.split()[-3]) == pytest.approx(acc, abs=0.01)


@pytest.mark.parametrize(
    ("oracle", "extra", "message"),
    [
        ("wrong_shape.ts", [], "returned (8, 3072) for 8 images; expected logits of shape (8, 6)"),
        ("garbage.pt2", [], "cannot load it as a torch.export program"),
        ("missing.pt2", [], "no such file"),
        ("oracle.pt2", ["--oracle_classes", "reversed.txt", "--oracle_arch", "wrn-10-1"], "give one of them"),
    ],
)
def test_a_bad_oracle_stops_before_any_training(cifar_folder, oracles, tmp_path, capsys, oracle, extra, message):
    extra = [str(oracles / e) if e.endswith(".txt") else e for e in extra]
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / oracle), *extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "db" / "folder" / "library_folder.pt").exists()


def test_unreadable_images_are_named_and_skipped_only_when_asked(cifar_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(cifar_folder, folder)
    bad = folder / "test" / "tank" / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    argv = ["--dataset", "folder", "--db", str(tmp_path / "db"), "--data_root", str(folder), "--device", "cpu",
            "--no_eval"]  # fmt: skip
    rc, _ = build(folder, tmp_path, "--stages", "oracle", "--oracle_arch", "wrn-10-1", "--train_limit", "64")
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot read image {bad}" in err and "--skip_bad_images" in err
    rc, _ = build(folder, tmp_path, "--stages", "oracle", "--oracle_arch", "wrn-10-1", "--train_limit", "64",
                  "--skip_bad_images")  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0 and f"skipped unreadable image {bad}" in captured.err
    row = next(line for line in captured.out.splitlines() if line.startswith("Oracle ("))
    assert row.split()[-2] == "120"  # 121 files in test/, the broken one skipped
    assert main_service([*argv, "--list"]) == 2  # no pool yet: only the Oracle was built


def test_tinyimagenet_classes_have_readable_names_everywhere(tmp_path, capsys):
    names = tiny_names()
    cfg = get_dataset("tinyimagenet")
    assert names[0] == "goldfish" and cfg.class_name(0) == "goldfish" and len(set(names)) == 200
    assert cfg.class_aliases(0) == ("n01443537",)  # a hierarchy file may still name it by its wnid
    official = need(shared_dir() / "official" / "tinyimagenet")
    assert main_service(["--dataset", "tinyimagenet", "--db", str(official), "--list"]) == 0
    out = capsys.readouterr().out
    assert "goldfish" in out and "n01443537" not in out


def test_tinyimagenet_validation_images_as_a_folder_dataset(tmp_path, capsys):
    val = need(shared_dir() / "data" / "tiny-imagenet-200" / "val")
    names = tiny_names()
    wnids = get_dataset("tinyimagenet").aliases
    keep = {wnids.index(w): [] for w in ("n01443537", "n01629819", "n01641577", "n01644900")}
    for line in (val / "val_annotations.txt").read_text().splitlines():
        file, wnid = line.split("\t")[:2]
        if wnids.index(wnid) in keep:
            keep[wnids.index(wnid)].append(val / "images" / file)
    root = tmp_path / "tiny"
    for c, files in keep.items():
        for split, part in (("train", files[:40]), ("val", files[40:])):
            (root / split / names[c]).mkdir(parents=True)
            for f in part:
                (root / split / names[c] / f.name).symlink_to(f)
    (root / "tasks.json").write_text(
        json.dumps({"fish": ["goldfish"], "amphibian": ["European fire salamander", "bullfrog", "tailed frog"]})
    )
    rc, _ = build(root, tmp_path, "--oracle_arch", "wrn-10-1", "--train_limit", "64")
    out = capsys.readouterr().out
    assert rc == 0, out
    assert json.loads((tmp_path / "db" / "folder" / "dataset.json").read_text())["image_size"] == 64
    assert main_service(["--dataset", "folder", "--db", str(tmp_path / "db"), "--list"]) == 0
    assert "[0 European fire salamander, 1 bullfrog, 3 tailed frog]" in capsys.readouterr().out
