"""ONNX export (fp32 and int8) on real data: onnxruntime against PyTorch on every test image of a query's classes
(the shipped CIFAR-100 pool, the original release and a MobileNetV2 pool), the int8 file's accuracy and size, the
server's download, the predictor that runs without PyTorch, and bad input."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from PoE.cli import main_service
from PoE.core.datasets import load_split
from PoE.core.errors import PoEError
from PoE.query.onnx_export import OnnxModel
from PoE.query.pool import Pool
from PoE.query.service import create_app

from .conftest import ROOT
from .large import build

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

QUERY = ["people", "vehicles_1", "vehicles_2"]


def service_json(capsys, *argv: str) -> dict:
    assert main_service([*argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def service_error(capsys, *argv: str) -> str:
    rc = main_service([*argv, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def assert_same_as_pytorch(path: Path, pool: Pool, tasks: list[str], test) -> int:
    """Every test image of the query's classes: the same argmax, logits within 1e-4; returns how many images."""
    model = pool.query(tasks)
    onnx_model = OnnxModel(path)
    assert onnx_model.class_ids == model.classes and onnx_model.class_names == model.class_names
    assert onnx_model.tasks == model.tasks and onnx_model.meta["pool_id"] == pool.part_id()
    subset, _ = test.with_classes(model.classes)
    x = subset.x.float() / 255
    want = model.logits(x).numpy()
    got = onnx_model.logits(x.numpy())
    assert got.dtype == np.float32 and got.shape == want.shape == (len(x), len(model.classes))
    assert np.abs(got - want).max() <= 1e-4
    assert np.array_equal(got.argmax(1), want.argmax(1))
    assert onnx_model.logits(x[:1].numpy()).shape == (1, len(model.classes))  # the batch dimension is dynamic
    return len(x)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, data_root) -> dict:
    """The README query from the shipped pool, exported by the command line as fp32 and int8 ONNX files."""
    out = tmp_path_factory.mktemp("onnx")
    results = {}
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        argv = [
            "--queriedTask",
            *QUERY,
            "--db",
            str(ROOT / "DB_PoE"),
            "--data_root",
            str(data_root),
            "--export",
            str(out / f"{name}.onnx"),
            "--json",
            "--device",
            "cpu",
            *extra,
        ]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(io.StringIO()):
            assert main_service(argv) == 0
        results[name] = json.loads(buffer.getvalue().strip().splitlines()[-1])
    return {"dir": out, **results}


def test_shipped_pool_onnx_equals_pytorch_on_every_test_image(shipped, data_root):
    pool = Pool.open(ROOT / "DB_PoE")
    test = load_split("cifar100", data_root, "test", progress=False)
    assert assert_same_as_pytorch(shipped["dir"] / "fp32.onnx", pool, QUERY, test) == 1500
    assert shipped["fp32"]["export_accuracy"] == shipped["fp32"]["accuracy"] == 73.0
    proto = onnx.load(shipped["dir"] / "fp32.onnx")
    onnx.checker.check_model(proto)
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 32, 32]


def test_original_release_onnx_equals_pytorch(tmp_path, official_cifar, data_root):
    pool = Pool.open(official_cifar)
    tasks = ["people", "small_mammals"]
    pool.query(tasks).export(tmp_path / "m.onnx")  # the Python API
    test = load_split("cifar100", data_root, "test", progress=False)
    assert assert_same_as_pytorch(tmp_path / "m.onnx", pool, tasks, test) == 1000


def test_int8_is_within_a_point_and_a_third_of_the_size(shipped):
    fp32, int8 = shipped["fp32"], shipped["int8"]
    assert int8["accuracy"] == fp32["accuracy"]  # the PyTorch model's, the same in both runs
    assert abs(int8["export_accuracy"] - fp32["export_accuracy"]) <= 1.0
    sizes = {n: (shipped["dir"] / f"{n}.onnx").stat().st_size for n in ("fp32", "int8")}
    assert sizes["int8"] <= 0.35 * sizes["fp32"], sizes
    model = OnnxModel(shipped["dir"] / "int8.onnx")
    assert model.meta["precision"] == "int8" and model.meta["calibration_images"] == "512"
    ops = {n.op_type for n in onnx.load(shipped["dir"] / "int8.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ form


def test_mobilenet_pool_onnx_equals_pytorch_and_int8_needs_its_training_split(
    large_folder,
    oracle_file,
    tmp_path,
    capsys,
):
    assert build(large_folder, tmp_path, "--oracle", str(oracle_file)) == 0
    capsys.readouterr()
    pool = Pool.open(tmp_path / "db", "folder")
    assert pool.cfg.family == "mobilenetv2"
    tasks = ["fish", "frogs"]
    base = ["--dataset", "folder", "--db", str(tmp_path / "db"), "--queriedTask", *tasks]
    r = service_json(capsys, *base, "--data_root", str(large_folder), "--export", str(tmp_path / "m.onnx"))
    test = load_split(pool.cfg, large_folder, "test", progress=False, classes=pool.query(tasks).classes)
    assert assert_same_as_pytorch(tmp_path / "m.onnx", pool, tasks, test) == r["n_test"] == 30
    assert r["export_accuracy"] == r["accuracy"]

    no_train = tmp_path / "no_train"  # the test images only: nothing to calibrate int8 on
    shutil.copytree(large_folder / "val", no_train / "val")
    line = service_error(
        capsys,
        *base,
        "--data_root",
        str(no_train),
        "--no_eval",
        "--export",
        str(tmp_path / "q.onnx"),
        "--quantize",
        "int8",
    )
    assert "int8 quantization calibrates on the training split" in line and "train" in line
    assert not (tmp_path / "q.onnx").exists()


def test_export_flags_and_paths_are_refused_before_any_work(capsys, tmp_path):
    base = ["--queriedTask", "people", "--no_eval"]
    cases = [
        (["--export", str(tmp_path / "m.tflite")], "the extension names the format; accepted: FILE.pt2"),
        (["--export", ""], "--export needs a file name ending in .pt2 or .onnx"),
        (["--export", str(tmp_path / "m.pt2"), "--quantize", "int8"], "--quantize int8 writes an ONNX file"),
        (["--export", str(tmp_path / "m.onnx"), "--export_precision", "bf16"], "bf16 is for .pt2 files"),
        (["--quantize", "int8"], "--quantize and --calibration_images go with --export FILE.onnx"),
        (["--export", str(tmp_path / "m.onnx"), "--calibration_images", "8"], "goes with --quantize int8"),
    ]
    for extra, says in cases:
        assert says in service_error(capsys, *base, *extra)
    assert main_service([*base, "--quantize", "int4"]) == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PoEError, match="the extension names the format"):
        Pool.open(ROOT / "DB_PoE").query(["people"]).export(tmp_path / "model")
    with pytest.raises(PoEError, match="int8 quantization needs data_root"):
        Pool.open(ROOT / "DB_PoE").query(["people"]).export(tmp_path / "m.onnx", quantize="int8")
    assert list(tmp_path.iterdir()) == []


def test_reading_bad_files_and_bad_input_is_one_line(shipped, tmp_path):
    (tmp_path / "m.pt2").write_bytes(b"PK\x03\x04 not a protobuf")
    for bad in (tmp_path / "m.pt2", tmp_path / "missing.onnx", ROOT / "README.md"):
        with pytest.raises(PoEError) as e:
            OnnxModel(bad)
        assert "\n" not in str(e.value)
    model = OnnxModel(shipped["dir"] / "fp32.onnx")
    bad_inputs = [
        (np.zeros((2, 3, 64, 64), np.float32), "got shape (2, 3, 64, 64)"),
        (np.zeros((0, 3, 32, 32), np.float32), "got shape (0, 3, 32, 32)"),
        (np.full((1, 3, 32, 32), 255.0, np.float32), "got values from 255 to 255 (divide 0..255 pixels by 255)"),
        (np.full((1, 3, 32, 32), np.nan, np.float32), "float RGB in [0, 1]"),
        (np.zeros((1, 3, 32, 32), np.uint8), "input must be a float numpy array"),
    ]
    for x, says in bad_inputs:
        with pytest.raises(PoEError, match=None) as e:
            model.logits(x)
        assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_server_downloads_the_onnx_model(data_root, tmp_path):
    pool = Pool.open(ROOT / "DB_PoE", "cifar100", device="cpu", precision="fp32")
    with TestClient(create_app(pool, data_root)) as client:
        q = client.post("/api/query", json={"tasks": ["vehicles_1", "people"]}).json()
        assert q["onnx"] == q["model"].removesuffix(".pt2") + ".onnx"
        r = client.get(q["onnx"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert 'filename="poe_vehicles_1__people.onnx"' in r.headers["content-disposition"]
        (tmp_path / "m.onnx").write_bytes(r.content)
        test = load_split("cifar100", data_root, "test", progress=False)
        assert assert_same_as_pytorch(tmp_path / "m.onnx", pool, ["vehicles_1", "people"], test) == 1000
        assert client.get(q["onnx"]).content == r.content  # exported once, then served from the app's cache
        for url in ("/api/models/0123456789abcdef-00.onnx", "/api/models/..%2Fx.onnx", "/api/models/.onnx"):
            r = client.get(url)
            assert r.status_code == 404 and "\n" not in r.json()["error"], (url, r.text)
        assert "/api/models/{key}.onnx" in client.get("/openapi.json").json()["paths"]


def no_torch_env(tmp_path: Path) -> dict[str, str]:
    """An environment in which ``import torch`` fails (a torch.py that raises, first on the path)."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "torch.py").write_text("raise ImportError('torch is blocked in this test')\n")
    return {"PYTHONPATH": str(block), "PATH": "/usr/bin:/bin"}


def test_predictor_runs_without_torch(shipped, tmp_path, data_root):
    env = no_torch_env(tmp_path)
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode == 1 and "torch is blocked" in check.stderr
    d = np.load(data_root / "cifar100" / "test.npz")
    folder = tmp_path / "images"
    folder.mkdir()
    model = Pool.open(ROOT / "DB_PoE").query(QUERY)
    picks = sorted({800, *np.flatnonzero(np.isin(d["y"], model.classes))[:3].tolist()})  # 800: a bicycle
    for i in picks:
        Image.fromarray(d["x"][i]).save(folder / f"{i:05d}.png")
    Image.fromarray(d["x"][800]).resize((64, 64)).save(folder / "big.jpg")  # resized to the model's 32 px
    script = str(ROOT / "examples" / "onnx_predict.py")
    run = subprocess.run(
        [sys.executable, script, str(shipped["dir"] / "fp32.onnx"), str(folder), "--top", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert lines[0] == "model fp32.onnx: tasks people, vehicles_1, vehicles_2; 15 classes"
    want = model.predict(np.stack([d["x"][i] for i in picks]))
    for j, (line, i) in enumerate(zip(lines[1:-1], picks, strict=True)):
        top = want.top(j, 2)
        assert line.startswith(f"{i:05d}.png: {top[0]['name']} {100 * top[0]['probability']:.2f}%, {top[1]['name']}")
    assert lines[-1].startswith("big.jpg: bicycle")
    one = subprocess.run(
        [sys.executable, script, str(shipped["dir"] / "int8.onnx"), str(folder / "00800.png")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert one.returncode == 0 and one.stdout.splitlines()[1].startswith("00800.png: bicycle"), one.stderr


def test_predictor_bad_input_is_one_line(shipped, tmp_path):
    env = no_torch_env(tmp_path)
    script = str(ROOT / "examples" / "onnx_predict.py")
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(image)
    (tmp_path / "not_a_model.onnx").write_bytes(b"\x00garbage")
    (tmp_path / "not_an_image.png").write_text("hello")
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain.onnx"  # a valid ONNX model without PoE's metadata
    proto = onnx.load(shipped["dir"] / "fp32.onnx")
    del proto.metadata_props[:]
    onnx.save(proto, plain)
    cases = [
        ([tmp_path / "not_a_model.onnx", image], "is not an ONNX model"),
        ([tmp_path / "missing.onnx", image], "no model file at"),
        ([plain, image], "an ONNX model without PoE's class metadata"),
        ([shipped["dir"] / "fp32.onnx", tmp_path / "not_an_image.png"], "cannot read"),
        ([shipped["dir"] / "fp32.onnx", tmp_path / "empty"], "no image files in folder"),
        ([shipped["dir"] / "fp32.onnx", tmp_path / "nothing"], "no image file or folder at"),
    ]
    for args, says in cases:
        run = subprocess.run(
            [sys.executable, script, *map(str, args)], env=env, capture_output=True, text=True, timeout=120
        )
        err = run.stderr.strip().splitlines()
        assert run.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], run.stderr
        assert run.stdout == ""
