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
from PoE.core.datasets import get_dataset
from PoE.core.datasets.cifar100 import CLASSES as CIFAR_NAMES
from PoE.core.datasets.tinyimagenet import class_names as tiny_names

from .conftest import ROOT, folder_argv, need, official_student, run_script, shared_dir

CLASSES = [0, 8, 17, 30, 48, 85]  # apple, bicycle, castle, dolphin, motorcycle, tank: folder ids 0..5
OWN = {"fruit_and_wheels": ["apple", "bicycle", "motorcycle"], "big": ["castle", "tank"], "sea": ["dolphin"]}
FAST = ("--profile quick --epochs 1 --teacher_views 1 --no_progress --device cpu --precision fp32").split()


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


class OnRgb(nn.Module):
    """A CIFAR-100 network on [0, 1] RGB, scoring the columns ``cols`` (all 100 by default)."""

    def __init__(self, net: nn.Module, cols: list[int] | None = None) -> None:
        super().__init__()
        cfg = get_dataset("cifar100")
        self.net = net
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))
        self.register_buffer("cols", torch.tensor(list(range(100)) if cols is None else cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)[:, self.cols]


def cifar_six(net: nn.Module, order: list[int]) -> OnRgb:
    """The original release's WRN-16-1 scoring the folder's six classes in the ``order`` given."""
    return OnRgb(net, [CLASSES[i] for i in order])


def to_onnx(model: nn.Module, size: int, path: Path) -> Path:
    """``model`` saved by torch's ONNX exporter (dynamo, through onnxscript) for any batch of ``size``-pixel RGB."""
    program = torch.onnx.export(
        model.eval(),
        (torch.rand(2, 3, size, size),),
        dynamo=True,
        verbose=False,
        dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},),
    )
    program.save(str(path))
    return path


def hand_onnx(path: Path, nodes: list, initializers: tuple = (), opsets: tuple = (("", 17),), dtype: int = 1) -> Path:
    """A one-input ONNX model written byte for byte (``onnx.save`` would act on external data itself)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", dtype, ["n", 3, 32, 32])
    graph = helper.make_graph(
        nodes, "oracle", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(initializers)
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    path.write_bytes(model.SerializeToString())
    return path


def crafted_onnx(out: Path) -> None:
    """ONNX files a hostile user could hand in: weights read from /etc/passwd, a custom-op domain, an endless Loop."""
    from onnx import TensorProto, helper

    weights = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[3072, 6])
    weights.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "/etc/passwd"), ("offset", "0"), ("length", str(3072 * 6 * 4))):
        entry = weights.external_data.add()
        entry.key, entry.value = key, value
    flat = helper.make_node("Flatten", ["x"], ["f"])
    hand_onnx(out / "external.onnx", [flat, helper.make_node("MatMul", ["f", "w"], ["y"])], (weights,))
    custom = helper.make_node("Steal", ["x"], ["y"], domain="evil.ops")
    hand_onnx(out / "custom.onnx", [custom], opsets=(("", 17), ("evil.ops", 1)))
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["v"], ["v_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [2**62])
    always = helper.make_tensor("always", TensorProto.BOOL, [], [True])
    loop = helper.make_node("Loop", ["trips", "always", "x"], ["y"], body=body)
    hand_onnx(out / "endless.onnx", [loop], (trips, always))
    hand_onnx(out / "integers.onnx", [helper.make_node("Flatten", ["x"], ["y"])], dtype=TensorProto.INT64)
    (out / "garbage.onnx").write_bytes(b"not a model")


def guarded_pt2(path: Path, marker: Path) -> None:
    """A valid torch.export program whose archive carries guard code that writes ``marker`` when it runs."""
    import zipfile

    program = torch.export.export(
        nn.Sequential(nn.Flatten(), nn.Linear(3072, 6)).eval(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},),
    )
    torch.export.save(program, path.with_suffix(".plain.pt2"))
    with zipfile.ZipFile(path.with_suffix(".plain.pt2")) as z:
        parts = [(info, z.read(info.filename)) for info in z.infolist()]
    with zipfile.ZipFile(path, "w") as out:
        for info, data in parts:
            if info.filename.endswith("models/model.json"):
                model = json.loads(data)
                model["guards_code"] = [f"__import__('pathlib').Path({str(marker)!r}).write_text('ran') > 0"]
                data = json.dumps(model).encode()
            out.writestr(info, data)


class Overwrite(nn.Module):
    """TorchScript that overwrites the start of a file through a shared mapping while it scores images."""

    def __init__(self, victim: str) -> None:
        super().__init__()
        self.victim = victim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        page = torch.from_file(self.victim, True, 4, dtype=torch.uint8)
        return x.flatten(1)[:, :6] + page.fill_(88)[0].float() * 0


class Endless(nn.Module):
    """TorchScript whose forward never returns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        while bool(x.sum() > -1.0):
            x = x + 1.0
        return x.flatten(1)[:, :6]


class Failing(nn.Module):
    """TorchScript that fails inside its forward (TorchScript reports it over several lines)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, 7)


@pytest.fixture(scope="module")
def oracles(tmp_path_factory, official_cifar) -> dict[str, Path]:
    """The stand-in Oracle exported as ONNX and with torch.export (folder order), as TorchScript in reversed
    order, and hostile or broken Oracle files."""
    import warnings

    out = tmp_path_factory.mktemp("oracles")
    net = official_student(official_cifar)
    to_onnx(cifar_six(net, list(range(6))), 32, out / "oracle.onnx")
    program = torch.export.export(
        cifar_six(net, list(range(6))).eval(),
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},),
    )
    torch.export.save(program, out / "oracle.pt2")
    reverse = list(reversed(range(6)))
    torch.jit.trace(cifar_six(net, reverse).eval(), torch.rand(2, 3, 32, 32)).save(str(out / "reversed.ts"))
    (out / "reversed.txt").write_text("\n".join(CIFAR_NAMES[CLASSES[i]] for i in reverse) + "\n")
    torch.jit.trace(nn.Flatten(), torch.rand(2, 3, 32, 32)).save(str(out / "wrong_shape.ts"))
    (out / "garbage.pt2").write_bytes(b"not a program")
    (out / "victim.txt").write_text("untouched")
    with warnings.catch_warnings():  # torch.jit.script is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(Overwrite(str(out / "victim.txt"))).save(str(out / "overwrite.ts"))
        torch.jit.script(Endless()).save(str(out / "endless.ts"))
        torch.jit.script(Failing()).save(str(out / "failing.ts"))
    guarded_pt2(out / "guarded.pt2", out / "guard_ran")
    crafted_onnx(out)
    return out


def args(folder: Path, tmp: Path, *extra: str) -> list[str]:
    return folder_argv(folder, tmp, FAST, *extra)


def build(folder: Path, tmp: Path, *extra: str) -> tuple[int, list[str]]:
    argv = args(folder, tmp, *extra)
    return main_preprocessing(argv), argv


def test_folder_pool_with_an_onnx_oracle(cifar_folder, oracles, tmp_path, capsys):
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / "oracle.onnx"))
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
    argv = [
        "--dataset",
        "folder",
        "--db",
        str(tmp_path / "db"),
        "--data_root",
        str(cifar_folder),
        "--json",
        "--queriedTask",
        "sea",
        "big",
        "--device",
        "cpu",
    ]
    assert main_service(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["class_names"] == ["castle", "dolphin", "tank"] and result["n_test"] == 60

    # the same Oracle as TorchScript (code: trusted) with its outputs reversed, and the file that says so
    rc, _ = build(
        cifar_folder,
        tmp_path / "ts",
        "--oracle",
        str(oracles / "reversed.ts"),
        "--oracle_classes",
        str(oracles / "reversed.txt"),
        "--stages",
        "oracle",
        "--trust_oracle_code",
    )
    ts_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Oracle ("))
    assert rc == 0 and float(ts_row.split()[-3]) == pytest.approx(acc, abs=0.01)


@pytest.mark.parametrize(
    ("oracle", "extra", "message"),
    [
        ("wrong_shape.ts", ["--trust_oracle_code"], "returned (8, 3072) for 8 images; expected logits of shape (8, 6)"),
        ("failing.ts", ["--trust_oracle_code"], "(RuntimeError: shape '[-1, 7]' is invalid for input of size"),
        ("garbage.pt2", ["--trust_oracle_code"], "cannot load it as a torch.export program"),
        ("garbage.pt2", [], "is code and can do anything you can: give --trust_oracle_code to run it"),
        ("garbage.onnx", [], "not an ONNX model (DecodeError"),
        ("missing.onnx", [], "no such file"),
        ("oracle.onnx", ["--oracle_classes", "reversed.txt", "--oracle_arch", "wrn-10-1"], "give one of them"),
    ],
)
def test_a_bad_oracle_stops_before_any_training(cifar_folder, oracles, tmp_path, capsys, oracle, extra, message):
    extra = [str(oracles / e) if e.endswith(".txt") else e for e in extra]
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / oracle), *extra)
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "db" / "folder" / "library_folder.pt").exists()


def test_a_program_oracle_is_refused_before_anything_of_it_runs(cifar_folder, oracles, tmp_path, capsys):
    # a .pt2 whose guard code writes a file, TorchScript that overwrites one: both ran before
    for name in ("guarded.pt2", "overwrite.ts"):
        rc, _ = build(cifar_folder, tmp_path / name, "--oracle", str(oracles / name))
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        assert f"--oracle {oracles / name}: a torch.export program (.pt2) or TorchScript file" in err
        assert "is code" in err and "--trust_oracle_code" in err and "torch.onnx.export" in err
    assert not (oracles / "guard_ran").exists()
    assert (oracles / "victim.txt").read_text() == "untouched"
    assert not (tmp_path / "guarded.pt2" / "db" / "folder" / "library_folder.pt").exists()
    rc, _ = build(cifar_folder, tmp_path, "--trust_oracle_code")
    assert rc == 2 and "name the file too" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("oracle", "message"),
    [
        ("external.onnx", "tensor 'w' keeps its data in another file, which is not read"),
        ("custom.onnx", "uses operators of domain 'evil.ops', which need a custom-op library that is not loaded"),
        ("integers.onnx", "takes an input that is not a float32 tensor; the Oracle must take one float32 tensor"),
    ],
)
def test_an_onnx_oracle_that_would_read_a_file_or_load_code_is_refused(
    cifar_folder, oracles, tmp_path, capsys, oracle, message
):
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / oracle))
    err = capsys.readouterr().err
    assert rc == 2 and message in err and err.count("\n") == 1, err


def test_an_endless_onnx_oracle_is_stopped_in_one_line(cifar_folder, oracles, tmp_path, capsys, monkeypatch):
    import time

    monkeypatch.setenv("POE_ORACLE_SECONDS", "2")
    t0 = time.perf_counter()
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / "endless.onnx"))
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "did not finish a batch of 8 images in 2 s (an endless loop?); $POE_ORACLE_SECONDS sets" in err
    assert seconds < 30
    assert not (tmp_path / "db" / "folder" / "library_folder.pt").exists()
    monkeypatch.setenv("POE_ORACLE_SECONDS", "soon")
    rc, _ = build(cifar_folder, tmp_path, "--oracle", str(oracles / "endless.onnx"))
    assert rc == 2 and "expected a positive number of seconds" in capsys.readouterr().err


def test_an_endless_trusted_program_ends_the_run_in_one_line(cifar_folder, oracles, tmp_path, monkeypatch):
    monkeypatch.setenv("POE_ORACLE_SECONDS", "3")  # the child process reads it
    argv = args(cifar_folder, tmp_path, "--oracle", str(oracles / "endless.ts"), "--trust_oracle_code")
    run = run_script("Run_preprocessing.py", *argv)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "did not finish a batch of 8 images in 3 s (an endless loop?)" in run.stderr
    assert not (tmp_path / "db" / "folder" / "library_folder.pt").exists()


def test_the_shipped_oracle_as_onnx_scores_as_its_torch_export_program(data_root, tmp_path, capsys):
    from PoE.build.baselines import load_oracle

    net = load_oracle(ROOT / "DB_pretrained", get_dataset("cifar100"), torch.device("cpu")).float().eval()
    onnx_file = to_onnx(OnRgb(net), 32, tmp_path / "shipped.onnx")
    program = torch.export.export(
        OnRgb(net).eval(), (torch.rand(2, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("n", min=1, max=4096)},)
    )
    torch.export.save(program, tmp_path / "shipped.pt2")
    accs = []
    for oracle, extra in ((onnx_file, []), (tmp_path / "shipped.pt2", ["--trust_oracle_code"])):
        argv = [
            "--dataset",
            "cifar100",
            "--data_root",
            str(data_root),
            "--db",
            str(tmp_path / oracle.suffix / "db"),
            "--pretrained",
            str(tmp_path / oracle.suffix / "pre"),
            "--stages",
            "oracle",
            "--oracle",
            str(oracle),
            "--test_limit",
            "500",
            *FAST,
            *extra,
        ]
        assert main_preprocessing(argv) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Oracle ("))
        assert row.split()[-2] == "500"
        accs.append(float(row.split()[-3]))
    assert 60.0 < accs[0] < 85.0 and accs[0] == pytest.approx(accs[1], abs=0.01)  # the shipped one: 72.03% of 10,000


def test_unreadable_images_are_named_and_skipped_only_when_asked(cifar_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(cifar_folder, folder)
    bad = folder / "test" / "tank" / "broken.png"
    bad.write_bytes(b"\x89PNG truncated")
    argv = [
        "--dataset",
        "folder",
        "--db",
        str(tmp_path / "db"),
        "--data_root",
        str(folder),
        "--device",
        "cpu",
        "--no_eval",
    ]
    rc, _ = build(folder, tmp_path, "--stages", "oracle", "--oracle_arch", "wrn-10-1", "--train_limit", "64")
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot read image {bad}" in err and "--skip_bad_images" in err
    rc, _ = build(
        folder, tmp_path, "--stages", "oracle", "--oracle_arch", "wrn-10-1", "--train_limit", "64", "--skip_bad_images"
    )
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
