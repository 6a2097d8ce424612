"""The manifest as the pool's table of contents: a part of another pool (with or without its metadata), a bit
flipped in stored metadata, a file added or removed behind the manifest's back, are each refused in one line
naming the file; a pool of an earlier version is upgraded by ``python -m PoE.build.migrate`` only when its files
agree with what its old manifest recorded. Everything here runs on copies of the shipped pools (no training)."""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest
import torch

from PoE.cli import main_service
from PoE.core.checkpoint import load_checkpoint, save_checkpoint
from PoE.core.errors import PoEError
from PoE.query.pool import Pool

from .conftest import ROOT, rewrite_part

QUERY = ["people", "vehicles_1", "vehicles_2"]


@pytest.fixture
def shipped(tmp_path):
    """A writable copy of the shipped pool (DB_PoE/cifar100); returns the pool folder."""
    shutil.copytree(ROOT / "DB_PoE", tmp_path / "db")
    return tmp_path / "db" / "cifar100"


def refused(pool, *match: str) -> str:
    with pytest.raises(PoEError) as e:
        Pool.open(pool)
    line = str(e.value)
    assert "\n" not in line and all(m in line for m in match), line
    return line


def flip_bit(x: float, bit: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", struct.unpack("<Q", struct.pack("<d", x))[0] ^ (1 << bit)))[0]


def test_the_shipped_pools_open_checked_and_without_notes():
    for db in (ROOT / "DB_PoE", ROOT / "DB_ablation" / "soft", ROOT / "DB_ablation" / "scale"):
        pool = Pool.open(db)
        assert pool.notes == [] and pool.id == json.loads((pool.root / "manifest.json").read_text())["library_id"]


def test_an_ablation_expert_with_its_metadata_is_refused(shipped, capsys, data_root):
    """Same library (so its library_id matches): it answered 68.47% instead of 73.00%, exit 0, no note."""
    shutil.copy(ROOT / "DB_ablation" / "soft" / "cifar100" / "experts" / "expert_people.pt", shipped / "experts")
    refused(shipped, "expert_people.pt differs from the part manifest.json lists")
    rc = main_service(
        ["--db", str(shipped.parent), "--data_root", str(data_root), "--queriedTask", *QUERY, "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert rc == 2 and "68.47" not in out.out and out.err.count("\n") == 1 and out.err.startswith("error: ")


@pytest.mark.parametrize("source", ["ablation", "original release"])
def test_a_bare_expert_in_a_pool_with_a_manifest_is_refused(shipped, official_cifar, source):
    """A bare state dict of another pool answered 68.47% (ablation) or 59.33% (original release), with a note."""
    if source == "ablation":
        bare = load_checkpoint(ROOT / "DB_ablation" / "soft" / "cifar100" / "experts" / "expert_people.pt")
        torch.save(bare["state_dict"], shipped / "experts" / "expert_people.pt")
    else:
        shutil.copy(official_cifar / "experts" / "expert_people.pt", shipped / "experts")
    refused(shipped, "expert_people.pt is a bare state dict", "only as a whole original-release pool")


def test_one_bit_flipped_in_a_stored_accuracy_is_caught(shipped, capsys):
    """It listed 'expert acc 106.40 %' with exit 0: the hash covered the weights only."""
    path = shipped / "experts" / "expert_people.pt"
    obj = load_checkpoint(path)
    obj["test_acc"] = flip_bit(obj["test_acc"], 51)  # 53.20 -> 69.20: plausible, and wrong
    save_checkpoint(path, obj)  # the digest in the file is the old one
    refused(shipped, "expert_people.pt: its weights or metadata do not match the digest recorded in the file")
    rewrite_part(path, lambda o: o.update(test_acc=obj["test_acc"]))  # a new digest, listed: the forger's pool
    shutil.copy(ROOT / "DB_PoE" / "cifar100" / "manifest.json", shipped / "manifest.json")  # the manifest as it was
    refused(shipped, "expert_people.pt differs from the part manifest.json lists")
    assert main_service(["--db", str(shipped.parent), "--list"]) == 2
    assert "69.20" not in capsys.readouterr().out


def test_files_added_or_removed_behind_the_manifest(shipped):
    manifest = json.loads((shipped / "manifest.json").read_text())
    del manifest["parts"]["experts/expert_people.pt"]  # as if a command adding it was killed before the manifest
    (shipped / "manifest.json").write_text(json.dumps(manifest))
    refused(shipped, "expert_people.pt is not listed in", "--stages experts --tasks people", "removing the file")
    (shipped / "experts" / "expert_people.pt").unlink()  # undone: the pool opens without it
    assert "people" not in Pool.open(shipped).experts
    (shipped / "experts" / "expert_fish.pt").unlink()
    refused(shipped, "manifest.json lists experts/expert_fish.pt, which is missing")


def test_a_pool_without_its_manifest_is_refused_unless_all_bare(shipped, official_cifar):
    (shipped / "manifest.json").unlink()
    refused(shipped, "library_cifar100.pt was written by this project, but the pool has no manifest.json")
    assert Pool.open(official_cifar).notes  # the original release: bare files, no manifest, loads with the note


def downgrade(pool) -> None:
    """Rewrite a pool as the previous version wrote it: parts without digests, a manifest without ``parts``."""
    for path in [pool / "library_cifar100.pt", *sorted((pool / "experts").glob("*.pt"))]:
        obj = load_checkpoint(path)
        del obj["digest"]
        save_checkpoint(path, {**obj, "poe_format": 1})
    manifest = json.loads((pool / "manifest.json").read_text())
    for key in ("manifest_format", "parts"):
        del manifest[key]
    (pool / "manifest.json").write_text(json.dumps(manifest))


def test_migration_upgrades_an_earlier_pool_only_when_its_files_agree(shipped, capsys):
    from PoE.build.migrate import main as migrate

    downgrade(shipped)
    refused(shipped, "lists no part digests", f"python -m PoE.build.migrate {shipped}")
    path = shipped / "experts" / "expert_vehicles_1.pt"
    good = path.read_bytes()
    save_checkpoint(path, {**load_checkpoint(path), "test_acc": 99.0})  # changed before the upgrade
    assert migrate([str(shipped)]) == 2
    assert "expert_vehicles_1.pt: its test_acc (99.0) differs from manifest.json's" in capsys.readouterr().err
    assert "parts" not in json.loads((shipped / "manifest.json").read_text())  # nothing written
    path.write_bytes(good)
    assert migrate([str(shipped)]) == 0
    pool, want = Pool.open(shipped), Pool.open(ROOT / "DB_PoE")
    assert pool.notes == [] and pool.part_id("people") == want.part_id("people")
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(pool.query(QUERY).logits(x), want.query(QUERY).logits(x))
    assert migrate([str(shipped)]) == 0 and "already current" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("main", "argv", "message"),
    [
        ("service", ["--batch_wait_ms", "inf"], "--batch_wait_ms: must be a number >= 0 and <= 10000, got inf"),
        ("service", ["--batch_wait_ms", "nan"], "argument --batch_wait_ms: must be a number >= 0 and <= 10000"),
        ("service", ["--batch_wait_ms", "1e12"], "argument --batch_wait_ms: must be a number >= 0 and <= 10000"),
        ("baselines", ["--lr", "nan"], "argument --lr: must be a number > 0 and <= 10, got nan"),
        ("baselines", ["--T", "inf"], "argument --T: must be a number > 0 and <= 100, got inf"),
        ("baselines", ["--budget", "1e300"], "argument --budget: must be a number > 0 and <= 100"),
        ("experiments", ["--lr", "inf"], "argument --lr: must be a number > 0 and <= 10, got inf"),
    ],
)
def test_non_finite_and_absurd_float_flags_are_refused_at_parsing(capsys, main, argv, message):
    import PoE.cli

    rc = getattr(PoE.cli, f"main_{main}")([*argv, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ------------------------------------------------------------------ test data and the Python API
@pytest.fixture(scope="module")
def shipped_model():
    return Pool.open(ROOT / "DB_PoE").query(QUERY)


def test_a_test_split_without_the_querys_classes_is_refused(tmp_path, capsys, shipped_model):
    """It printed 'nan%' with exit 0 and --json printed NaN; a split with one label raised IndexError."""
    import numpy as np

    from PoE.core.data import ImageSet

    (tmp_path / "cifar100").mkdir()
    np.savez(tmp_path / "cifar100" / "test.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    rc = main_service(
        [
            "--db",
            str(ROOT / "DB_PoE"),
            "--data_root",
            str(tmp_path),
            "--queriedTask",
            *QUERY,
            "--json",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr()
    assert rc == 2 and "nan" not in out.out.lower() and len(out.err.strip().splitlines()) == 1
    assert "the test split has no images of 15 of the query's 15 classes (2 baby, 8 bicycle, 11 boy" in out.err
    from PoE.cli import main_evaluation

    rc = main_evaluation(
        ["--db", str(ROOT / "DB_PoE"), "--data_root", str(tmp_path), "--tasks", *QUERY, "--json", "--device", "cpu"]
    )
    out = capsys.readouterr()
    assert rc == 2 and "nan" not in out.out.lower() and "no images of 15 of the query's 15 classes" in out.err
    half = ImageSet(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.tensor([2, 8]))  # 2 of the 15 classes
    with pytest.raises(PoEError, match="no images of 13 of the query's 15 classes"):
        shipped_model.accuracy(half)


def test_a_data_file_whose_header_claims_a_billion_images_is_one_line(tmp_path):
    """A 1.5 KB npz claiming 10^9 images ended in numpy's _ArrayMemoryError: sizes are checked before allocating."""
    import io
    import zipfile

    import numpy as np

    from PoE.core.datasets import load_split

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 32, 32, 3)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    (tmp_path / "cifar100").mkdir()
    with zipfile.ZipFile(tmp_path / "cifar100" / "test.npz", "w") as z:
        z.writestr("x.npy", header.getvalue() + bytes(1000))
        z.writestr("y.npy", labels.getvalue())
    assert (tmp_path / "cifar100" / "test.npz").stat().st_size < 2000
    with pytest.raises(PoEError, match=r"test\.npz: array x claims \(1000000000, 32, 32, 3\) uint8"):
        load_split("cifar100", tmp_path, "test")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.predict(torch.full((1, 3, 32, 32), float("nan"))), "float images hold NaN or inf values"),
        (lambda m: m.predict(torch.full((3, 32, 32), float("inf"))), "float images hold NaN or inf values"),
        (lambda m: m.predict(__import__("numpy").zeros((0, 32, 32, 3), "uint8")), "no images given (an empty batch"),
        (lambda m: m.predict(torch.zeros(0, 3, 32, 32)), "no images given (an empty batch"),
        (lambda m: m.predict(torch.rand(2, 3, 32, 32)).top(0, k=-1), "k must be an integer >= 1"),
        (lambda m: m.predict(torch.rand(2, 3, 32, 32)).top(5), "i must be an image index, 0..1"),
    ],
)
def test_the_python_api_refuses_what_it_cannot_answer(shipped_model, call, message):
    """An all-NaN image was predicted (as 'baby'); the others raised raw exceptions."""
    with pytest.raises(PoEError, match=re.escape(message)):
        call(shipped_model)


def test_the_python_api_refuses_bad_queries_and_precisions():
    pool = Pool.open(ROOT / "DB_PoE")
    for bad in (None, "people", [None], []):
        with pytest.raises(PoEError, match=r"a query is a list of task names|empty query"):
            pool.query(bad)
    with pytest.raises(PoEError, match=re.escape("unknown precision 'fp8'; known: auto, fp32, bf16")):
        Pool.open(ROOT / "DB_PoE", precision="fp8")


# ------------------------------------------------------------------ a full disk
@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (CI runs as root); skipped where mounting is not allowed."""
    import subprocess

    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_export_to_a_full_disk_is_one_line_and_leaves_nothing(full_disk, capsys):
    """It ended in SIGABRT (exit 134): torch.export.save's writer aborts when the disk refuses."""
    target = full_disk / "model.pt2"
    assert (
        main_service(
            [
                "--db",
                str(ROOT / "DB_PoE"),
                "--queriedTask",
                "people",
                "--no_eval",
                "--export",
                str(target),
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    assert f"cannot write {target}: No space left on device" in one_line_error(capsys)
    assert list(full_disk.iterdir()) == []


def test_training_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, full_disk, capsys):
    """The first epoch's resume file does not fit: it was an OSError (errno 28) traceback."""
    from PoE.cli import main_preprocessing

    from .conftest import fake_cifar

    root = fake_cifar(tmp_path / "data", 128, 100)
    rc = main_preprocessing(
        [
            "--profile",
            "quick",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--epochs",
            "1",
            "--oracle_arch",
            "wrn-10-1",
            "--batch_size",
            "128",
            "--stages",
            "oracle",
            "--no_progress",
            "--data_root",
            str(root),
            "--db",
            str(tmp_path / "db"),
            "--pretrained",
            str(full_disk),
        ]
    )
    line = one_line_error(capsys)
    assert rc == 2 and f"cannot write {full_disk / 'cifar100' / 'resume' / 'oracle.pt'}: No space left" in line
    assert [p for p in full_disk.rglob("*") if p.is_file()] == []


def test_a_checkpoint_whose_index_fails_leaves_none_of_its_shards(tmp_path, monkeypatch):
    from PoE.core import checkpoint

    real = checkpoint.atomic_write

    def index_fails(path, write, buffered=False):
        if path.name == "ck.pt":
            raise PoEError(f"cannot write {path}: No space left on device")
        real(path, write, buffered)

    monkeypatch.setattr(checkpoint, "atomic_write", index_fails)
    state = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    with pytest.raises(PoEError, match="No space left"):
        checkpoint.save_checkpoint(tmp_path / "ck.pt", {"state_dict": state}, shard_bytes=4000)
    assert list(tmp_path.iterdir()) == []
