"""Folders of large images (> 64 pixels): a MobileNetV2 library distilled from the user's exported Oracle.

The data: Tiny-ImageNet validation images of four classes, upscaled to 96 pixels and written as a PNG image
folder. The Oracle: the original Tiny-ImageNet release's WRN-16-2 (library + the classifier trained with it),
which reads the images downscaled back to 64 pixels, exported as ONNX for 96-pixel input. Both are
made by scripts/tiny_large_folder.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from PoE.cli import main_evaluation, main_service
from PoE.core.datasets import get_dataset

from .large import SIZE, build


def test_large_image_pool_with_an_exported_oracle(large_folder, oracle_file, tmp_path, capsys):
    rc = build(large_folder, tmp_path, "--oracle", str(oracle_file))
    out = capsys.readouterr().out
    assert rc == 0, out
    row = next(line for line in out.splitlines() if line.startswith("Oracle ("))
    assert 60.0 < float(row.split()[-3]) <= 100.0 and row.split()[-2] == "40"  # a real network on real images
    assert "library student (mobilenet_v2-0.5)" in out and "expert frogs" in out
    assert "[oracle] epoch" not in out  # the Oracle was not trained
    pool = tmp_path / "db" / "folder"
    assert json.loads((pool / "dataset.json").read_text())["image_size"] == SIZE
    lib = torch.load(pool / "library_folder.pt", weights_only=True)
    assert lib["family"] == "mobilenetv2" and lib["state_dict"]["features.0.0.weight"].shape[0] == 16  # width 0.5

    # the pool answers queries on the folder's 96-pixel images, and Run_Evaluation runs over it
    argv = [
        "--dataset",
        "folder",
        "--db",
        str(tmp_path / "db"),
        "--data_root",
        str(large_folder),
        "--json",
        "--queriedTask",
        "fish",
        "frogs",
        "--device",
        "cpu",
        "--export",
        str(tmp_path / "model.pt2"),
    ]
    assert main_service(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["class_names"] == ["bullfrog", "goldfish", "tailed frog"] and result["n_test"] == 30
    # the exported program (float RGB in [0, 1] at 96 pixels) scores the query's test images as the pool did
    from PIL import Image

    x, y = [], []
    for label, name in enumerate(result["class_names"]):
        for f in sorted((large_folder / "val" / name).iterdir()):
            x.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255)
            y.append(label)
    program = torch.export.load(str(tmp_path / "model.pt2")).module()
    acc = 100.0 * float((program(torch.stack(x)).argmax(1) == torch.tensor(y)).float().mean())
    assert acc == pytest.approx(result["accuracy"], abs=0.01)  # the service rounds to 2 decimals
    argv = [
        "--dataset",
        "folder",
        "--db",
        str(tmp_path / "db"),
        "--data_root",
        str(large_folder),
        "--device",
        "cpu",
        "--n",
        "2",
        "--out",
        str(tmp_path / "eval"),
    ]
    assert main_evaluation(argv) == 0
    assert "fish" in capsys.readouterr().out


def test_an_oracle_for_another_image_size_is_refused(large_folder, oracle_file, tmp_path, capsys):
    rc = build(large_folder, tmp_path, "--oracle", str(oracle_file), "--image_size", "128")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "failed on a batch of 8 images of 3 x 128 x 128" in err and "--image_size" in err
    assert not (tmp_path / "db" / "folder" / "library_folder.pt").exists()
    # the refused run pinned nothing: the same folders take the Oracle's own size next
    assert build(large_folder, tmp_path, "--oracle", str(oracle_file), "--stages", "oracle") == 0
    assert json.loads((tmp_path / "pre" / "folder" / "dataset.json").read_text())["image_size"] == SIZE


def test_a_split_over_the_decoded_size_limit_is_refused_before_decoding(large_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("POE_MAX_DECODED_GB", "0.002")  # 2 MB: the 80 training images of 96 px take 2.2 MB
    rc = build(large_folder, tmp_path, "--stages", "oracle")
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "80 images of 96x96 pixels take 2.2 MB decoded (28 KB each), over the limit of 2.0 MB" in err
    monkeypatch.setenv("POE_MAX_DECODED_GB", "lots")
    assert build(large_folder, tmp_path, "--stages", "oracle") == 2
    assert "expected a positive number of gigabytes" in capsys.readouterr().err


def test_large_folders_get_the_mobilenet_family(large_folder):
    from PoE.core.datasets import described_by_data
    from PoE.core.networks import build_network, family_of
    from PoE.core.networks.mobilenetv2 import library_from_state

    cfg = described_by_data(get_dataset("folder"), large_folder, None, False, [])
    assert cfg.image_size == SIZE and cfg.num_classes == 4  # the images' own size: not upscaled to 224
    assert family_of(cfg).name == "mobilenetv2" and cfg.crop_pad == 12
    student = build_network(cfg.networks.library_arch, cfg)
    assert student(torch.rand(2, 3, SIZE, SIZE)).shape == (2, 4)
    lib = library_from_state(student.front.state_dict())  # the width is read back from the shapes
    assert lib.width == 0.5 and lib.out_channels == 160
    small = described_by_data(get_dataset("folder"), large_folder, 64, False, [])
    assert family_of(small).name == "wrn"
    assert np.isclose(sum(p.numel() for p in lib.parameters()) / 1e6, 0.48, atol=0.01)


def test_oracle_and_library_trained_here_can_start_from_local_mobilenet_weights(large_folder, tmp_path, capsys):
    import torchvision

    full = torchvision.models.mobilenet_v2(weights=None).state_dict()  # stands in for ImageNet's (not fetched)
    torch.save(full, tmp_path / "mobilenet_v2.pth")
    start = str(tmp_path / "mobilenet_v2.pth")
    rc = build(
        large_folder,
        tmp_path,
        "--stages",
        "oracle",
        "library",
        "--oracle_weights",
        start,
        "--library_weights",
        start,
        "--train_limit",
        "40",
    )
    assert rc == 0, capsys.readouterr().err
    assert "library student (mobilenet_v2)" in capsys.readouterr().out
    pre = tmp_path / "pre" / "folder"
    for name, dtype in (("oracle.pt", torch.float16), ("library_student.pt", torch.float32)):
        part = torch.load(pre / name, weights_only=True)
        assert part["arch"] == "mobilenet_v2" and part["start"] == start
        got, was = part["state_dict"]["back.conv.0.weight"], full["features.18.0.weight"]
        assert got.dtype == dtype and (got.float() - was).norm() < 0.1 * was.norm()  # fine-tuned, not a new draw
    # a later run without the flag loads the width-1 student as it was made, and its front is the pool's library
    assert build(large_folder, tmp_path, "--stages", "library", "--train_limit", "40") == 0
    assert capsys.readouterr().out.startswith("nothing trained")  # loaded as it was: a misfit would train again
    lib = torch.load(tmp_path / "db" / "folder" / "library_folder.pt", weights_only=True)
    assert lib["state_dict"]["features.0.0.weight"].shape[0] == 32  # width 1
    # folders that hold parts built at 96 pixels refuse another size (a refused run's dataset.json alone does not)
    assert build(large_folder, tmp_path, "--stages", "library", "--image_size", "128") == 2
    assert "was built from 4 classes at 96 pixels" in capsys.readouterr().err

    torch.save(torchvision.models.mobilenet_v2(weights=None, width_mult=0.5).state_dict(), tmp_path / "half.pth")
    for i, (extra, message) in enumerate(
        [
            (
                ["--oracle_weights", str(tmp_path / "half.pth")],
                "not the weights of a whole MobileNetV2 of width 1.0 (front.features.0.0.weight: (16, 3, 3, 3)",
            ),
            (
                ["--oracle_weights", start, "--oracle_arch", "wrn-10-1"],
                "this run's Oracle is wrn-10-1: give --oracle_arch mobilenet_v2",
            ),
            (["--library_weights", start, "--image_size", "64"], "folder at 64 pixels distills a wrn-16-2"),
            (
                ["--image_size", "7"],
                "folder at 7 pixels is below the wrn networks' smallest image side (8): give --image_size 8 or more",
            ),
        ]
    ):
        assert build(large_folder, tmp_path / f"bad{i}", "--stages", "oracle", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
