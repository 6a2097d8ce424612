"""A pool that cannot silently answer wrong: mixed, damaged or non-finite parts are refused with one line
naming the file; preprocessing never leaves a mixed pool; bad data and bad images are one-line errors."""

from __future__ import annotations

import json
import pickle
import re
import shutil

import numpy as np
import pytest
import torch

from PoE.cli import main_preprocessing, main_service
from PoE.core import precision
from PoE.core.checkpoint import load_checkpoint, tensors_id
from PoE.core.datasets import load_split
from PoE.core.errors import PoEError
from PoE.core.precision import cpu_bf16_supported, cpu_model
from PoE.query.pool import Pool

from .conftest import ROOT, TINY, relist, rewrite_part


def service_error(capsys, *argv: str) -> str:
    rc = main_service([*argv, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and "weights_only" not in err[0]
    return err[0]


@pytest.fixture
def pool_copy(tmp_path, tiny_pool):
    """A writable copy of the tiny pool (every part carries its content hash and library id)."""
    dst = tmp_path / "db"
    shutil.copytree(tiny_pool["db"], dst)
    return dst


def edit(path, change) -> None:
    """Rewrite a checkpoint with its weights changed but its recorded metadata (weights hash) kept; the file's
    digest and the manifest are made to agree, so that the checks beneath them are what is tested."""
    rewrite_part(path, lambda obj: change(obj["state_dict"]))


def test_a_library_of_another_pool_is_refused(capsys, pool_copy, official_cifar):
    lib = pool_copy / "cifar100" / "library_cifar100.pt"
    shutil.copy(official_cifar / "library_cifar100.pt", lib)  # bare: no metadata, nothing to check it against
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "vehicles_1", "--no_eval")
    assert "library_cifar100.pt is 181,866 bytes, but" in line  # refused by its size, before it is read
    relist(lib)  # listed with its size and SHA-256: refused once read, for what it is
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "vehicles_1", "--no_eval")
    assert "library_cifar100.pt is a bare state dict" in line
    bare = load_checkpoint(official_cifar / "library_cifar100.pt")  # wrapped, sealed and listed: the experts object
    rewrite_part(lib, lambda obj: obj.update(poe_format=1, kind="library", id=tensors_id(bare), state_dict=bare))
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "vehicles_1", "--no_eval")
    assert "expert_people.pt was extracted from library" in line and "do not belong together" in line


def test_changed_weights_fail_the_content_hash(capsys, pool_copy):
    edit(pool_copy / "cifar100" / "library_cifar100.pt", lambda sd: sd["conv1.weight"].mul_(1.001))
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "--no_eval")
    assert "library_cifar100.pt: the library's weights do not match the content hash" in line


def test_a_flipped_byte_is_caught(capsys, pool_copy):
    path = pool_copy / "cifar100" / "experts" / "expert_people.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))
    assert "expert_people.pt" in service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "--no_eval")


def test_non_finite_weights_are_refused(capsys, pool_copy):
    edit(pool_copy / "cifar100" / "experts" / "expert_vehicles_1.pt", lambda sd: sd["fc.weight"].fill_(float("nan")))
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "--no_eval")
    assert "expert_vehicles_1.pt: expert of 'vehicles_1' has non-finite weights (fc.weight" in line


def test_a_pickle_with_code_is_refused_without_unsafe_advice(capsys, pool_copy):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(pool_copy / "cifar100" / "experts" / "expert_people.pt", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    relist(pool_copy / "cifar100" / "experts" / "expert_people.pt")  # past the size and SHA-256 check: torch reads it
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "--no_eval")
    assert "refused: it holds Python objects or code besides tensors" in line


def test_zero_byte_expert_and_malformed_manifest(capsys, pool_copy):
    (pool_copy / "cifar100" / "experts" / "expert_vehicles_2.pt").write_bytes(b"")
    relist(pool_copy / "cifar100" / "experts" / "expert_vehicles_2.pt")
    rc = main_service(["--db", str(pool_copy), "--list"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "expert_vehicles_2.pt" in err and "empty (0 bytes)" in err
    (pool_copy / "cifar100" / "manifest.json").write_text("{not json")
    line = service_error(capsys, "--db", str(pool_copy), "--list")
    assert "manifest.json: not JSON (" in line


def test_retraining_the_library_removes_its_old_experts(pool_copy, tiny_pool, data_root, capsys):
    pre = pool_copy.parent / "pre"
    shutil.copytree(tiny_pool["pretrained"], pre)
    rc = main_preprocessing(
        [
            *TINY,
            "--data_root",
            str(data_root),
            "--db",
            str(pool_copy),
            "--pretrained",
            str(pre),
            "--stages",
            "library",
            "--retrain",
            "library",
            "--seed",
            "1",
        ]
    )
    assert rc == 0
    pool = pool_copy / "cifar100"
    assert list((pool / "experts").glob("*.pt")) == []
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["experts"] == {} and manifest["library_id"] == load_checkpoint(pool / "library_cifar100.pt")["id"]
    capsys.readouterr()
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "--no_eval")
    assert "missing" in line and "expert_people.pt" in line and "--stages experts --tasks people" in line


def test_the_original_release_loads_with_a_note(capsys, official_cifar):
    assert main_service(["--db", str(official_cifar), "--queriedTask", "people", "--no_eval", "--device", "cpu"]) == 0
    assert "note: 7 part(s) carry no content hash" in capsys.readouterr().out


def test_unwritable_outputs_fail_before_any_work(capsys, tmp_path, data_root):
    rc = main_preprocessing(
        [*TINY, "--data_root", str(data_root), "--db", "/proc/poe_db", "--pretrained", str(tmp_path / "pre")]
    )
    err = capsys.readouterr()
    assert rc == 2 and "cannot write into /proc/poe_db" in err.err and "epoch" not in err.out
    assert not (tmp_path / "pre").exists()
    line = service_error(
        capsys,
        "--db",
        str(ROOT / "DB_PoE"),
        "--data_root",
        str(data_root),
        "--queriedTask",
        "people",
        "--export",
        "/proc/model.pt2",
    )
    assert "cannot export to /proc/model.pt2" in line


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.write_bytes(b""), "is not a readable npz with arrays x and y (the file is empty (0 bytes))"),
        (lambda d: d.write_bytes(d.read_bytes()[:5000]), "is not a readable npz with arrays x and y"),
        (lambda d: np.savez(d, x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros(0, np.int64)), "holds no images"),
        (
            lambda d: np.savez(d, x=np.zeros((4, 28, 28, 3), np.uint8), y=np.zeros(4, np.int64)),
            "images are 28x28, this dataset's are 32x32",
        ),
        (
            lambda d: np.savez(d, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 2, 100])),
            "labels must be 0..99, found 0..100",
        ),
    ],
)
def test_bad_data_files_are_one_line_errors(tmp_path, data_root, change, message):
    folder = tmp_path / "cifar100"
    folder.mkdir()
    shutil.copy(data_root / "cifar100" / "test.npz", folder / "test.npz")
    change(folder / "test.npz")
    with pytest.raises(PoEError, match=r"test\.npz") as e:
        load_split("cifar100", tmp_path, "test")
    assert message in str(e.value)


def test_torchvision_cifar_folder_is_read_as_it_is(tmp_path, data_root):
    """--data_root may be torchvision's own download (cifar-100-python/ with its pickled batches)."""
    real = load_split("cifar100", data_root, "test")
    x = real.x[:64].numpy().reshape(64, -1)
    (tmp_path / "cifar-100-python").mkdir()
    with open(tmp_path / "cifar-100-python" / "test", "wb") as f:
        pickle.dump({"data": x, "fine_labels": real.y[:64].tolist(), "filenames": ["a.png"] * 64}, f)
    for root in (tmp_path, tmp_path / "cifar-100-python"):
        got = load_split("cifar100", root, "test")
        assert torch.equal(got.x, real.x[:64]) and torch.equal(got.y, real.y[:64])


def test_a_failed_download_leaves_no_folders(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(PoEError, match="torchvision download failed"):
        load_split("cifar100", tmp_path / "data", "test")
    assert list(tmp_path.iterdir()) == []


def test_predict_takes_arrays_pil_and_tensors_alike(official_cifar, data_root):
    from PIL import Image

    model = Pool.open(official_cifar).query(["people", "vehicles_1"])
    test, _ = load_split("cifar100", data_root, "test").with_classes(model.classes)
    hwc = test.x[:6].permute(0, 2, 3, 1).numpy()
    want = model.predict(hwc)
    assert want.class_names[0] in model.class_names and want.probabilities.shape == (6, 10)
    for other in (list(hwc), [Image.fromarray(im) for im in hwc], test.x[:6].float() / 255, test.x[:6]):
        got = model.predict(other)
        assert got.class_ids == want.class_ids
        torch.testing.assert_close(got.probabilities, want.probabilities)
    top = want.top(0, 2)
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"] and top[0]["id"] in model.classes
    for bad, message in (
        (test.x[:2].float(), "float images must be in [0, 1]"),
        (np.zeros((2, 64, 64, 3), np.uint8), "images are 64x64, this pool takes 32x32"),
        (hwc.astype(np.float32), "numpy images must be uint8"),
        ([], "no images given"),
    ):
        with pytest.raises(PoEError, match=re.escape(message)):
            model.predict(bad)


def test_exported_model_states_its_input_contract(tmp_path, data_root):
    """The README query's fp32 export predicts exactly as eager fp32 on its real test images (on every CPU, also one
    without bf16), and refuses input outside its contract."""
    test = load_split("cifar100", data_root, "test", progress=False)
    model = Pool.open(ROOT / "DB_PoE").query(["people", "vehicles_1", "vehicles_2"])
    model.export(tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = test.x[torch.isin(test.y, torch.tensor(model.classes))].float() / 255
    with torch.no_grad():
        assert torch.equal(program(x).argmax(1), model.logits(x).argmax(1))
        torch.testing.assert_close(program(x[:2]), model.logits(x[:2]), rtol=1e-5, atol=1e-5)
        for bad, message in (
            (x * 255, r"float RGB in \[0, 1\]"),
            ((x * 255).to(torch.uint8), r"float RGB in \[0, 1\]"),
            (torch.rand(2, 3, 64, 64), "N x 3 x 32 x 32"),
        ):
            with pytest.raises(RuntimeError, match=message):
                program(bad)


@pytest.mark.skipif(not cpu_bf16_supported(), reason=f"the CPU {cpu_model()} has no bfloat16 support")
@pytest.mark.parametrize("tasks", [["people"], ["people", "vehicles_1", "vehicles_2"]])  # the README's query
def test_bf16_answers_like_fp32_on_the_shipped_pool(tmp_path, data_root, tasks):
    """bf16 (eager and exported) predicts the fp32 class on at least 99% of the query's real test images; the
    fp32 export exactly as eager fp32. ``people``, the least certain expert, flipped 1.8% while logits were bf16."""
    test = load_split("cifar100", data_root, "test", progress=False)
    fp32, bf16 = (Pool.open(ROOT / "DB_PoE", precision=p).query(tasks) for p in ("fp32", "bf16"))
    keep = torch.isin(test.y, torch.tensor(fp32.classes))
    x = test.x[keep].float() / 255
    want = fp32.logits(x).argmax(1)
    bf16.export(tmp_path / "bf16.pt2", precision="bf16")
    fp32.export(tmp_path / "fp32.pt2")
    with torch.no_grad():
        exported = {p: torch.export.load(str(tmp_path / f"{p}.pt2")).module()(x).argmax(1) for p in ("fp32", "bf16")}
    assert torch.equal(exported["fp32"], want)
    for got in (bf16.logits(x).argmax(1), exported["bf16"]):
        assert (got == want).float().mean() >= 0.99, (got == want).float().mean()


def test_bf16_on_a_cpu_without_it_is_refused_in_one_line(monkeypatch):
    """Where the CPU cannot run bf16 (AVX2 only), asking for it is an error naming the CPU and what runs; auto
    falls back to fp32."""
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "cpu_bf16_fast", lambda: False)
    with pytest.raises(PoEError, match=r"^--precision bf16: the CPU .* has no bfloat16 support; use --precision fp32"):
        Pool.open(ROOT / "DB_PoE", precision="bf16")
    assert Pool.open(ROOT / "DB_PoE", precision="auto").precision == "fp32"


def test_preprocessing_never_adopts_a_part_the_manifest_does_not_list(pool_copy, tiny_pool, data_root, capsys):
    """A self-consistent expert file (its own digest recomputed) that the manifest does not list as it is, is
    made again, not written into the manifest: preprocessing cannot launder a foreign part into a pool."""
    pre = pool_copy.parent / "pre"
    shutil.copytree(tiny_pool["pretrained"], pre)
    pool = pool_copy / "cifar100"
    manifest = (pool / "manifest.json").read_text()
    rewrite_part(pool / "experts" / "expert_people.pt", lambda obj: obj.update(test_acc=99.0))
    (pool / "manifest.json").write_text(manifest)
    capsys.readouterr()
    rc = main_preprocessing(
        [*TINY, "--data_root", str(data_root), "--db", str(pool_copy), "--pretrained", str(pre), "--stages", "experts"]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "expert_people.pt is not the part manifest.json lists: making it again" in out
    assert load_checkpoint(pool / "experts" / "expert_people.pt")["test_acc"] != 99.0
    assert Pool.open(pool_copy).notes == []


def test_list_says_on_how_many_test_images_each_expert_was_scored(capsys, tiny_pool):
    """The tiny pool was scored with --test_limit 1000: its experts' accuracies rest on tens of images, not 500."""
    assert main_service(["--db", str(tiny_pool["db"]), "--list"]) == 0
    counts = [int(n) for n in re.findall(r"expert acc [\d.]+% on (\d+) test images", capsys.readouterr().out)]
    assert len(counts) == 3 and all(0 < n < 500 for n in counts), counts
