"""Preprocessing: a tiny real-data run, reloading, resuming, the teacher cache, CKD on real features."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from PoE.build.profiles import StageConfig
from PoE.build.teacher import TeacherOutputs
from PoE.build.train import Feed, Resume, train_stage
from PoE.cli import main_preprocessing, main_service
from PoE.core.checkpoint import load_checkpoint, save_checkpoint, state_id
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import load_split
from PoE.core.errors import PoEError
from PoE.core.loaders import Batch, Draw, TensorLoader
from PoE.core.networks import WideResNet, WRNSpec
from PoE.core.runtime import CPU

from .conftest import ROOT, TINY, fake_cifar, install_stand_in_oracle

# two epochs of the smallest networks on a generated data folder, one task: for runs interrupted and resumed
GENERATED = (
    "--profile quick --device cpu --precision fp32 --epochs 2 --oracle_arch wrn-10-1 --batch_size 128 "
    "--teacher_views 1 --tasks people --no_progress"
).split()


def stopping_at(epoch: int, batches):
    """``batches`` that raise KeyboardInterrupt as epoch ``epoch`` (from 0) starts, as Ctrl-C would."""

    def draw(e: int):
        if e == epoch:
            raise KeyboardInterrupt
        return batches(e)

    return draw


def test_tiny_run_builds_a_pool_the_service_loads(tiny_pool, data_root, capsys):
    pool = tiny_pool["pool"]
    assert (pool / "library_cifar100.pt").is_file()
    assert sorted(p.name for p in (pool / "experts").iterdir()) == [
        "expert_people.pt",
        "expert_vehicles_1.pt",
        "expert_vehicles_2.pt",
    ]
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["profile"] == "quick" and manifest["settings"]["train_limit"] == 1024
    assert set(manifest["experts"]) == {"people", "vehicles_1", "vehicles_2"}
    assert manifest["train_data_sha256"] and manifest["oracle"]["arch"] == "wrn-10-1"
    expert = load_checkpoint(pool / "experts" / "expert_people.pt")
    assert expert["kind"] == "expert" and expert["classes"] == [2, 11, 35, 46, 98]
    assert not (tiny_pool["pretrained"] / "cifar100" / "resume" / "oracle.pt").exists()
    capsys.readouterr()
    rc = main_service(
        [
            "--db",
            str(tiny_pool["db"]),
            "--data_root",
            str(data_root),
            "--queriedTask",
            "people",
            "vehicles_2",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["n_test"] == 1000 and 0.0 <= r["accuracy"] <= 100.0


def file_digests(*folders: Path) -> dict[Path, str]:
    """SHA-256 of every file under ``folders``."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def test_second_run_loads_instead_of_training_and_writes_nothing(tiny_pool, data_root, capsys):
    capsys.readouterr()
    argv = [*TINY, "--data_root", str(data_root), "--db", str(tiny_pool["db"]), "--pretrained"]
    argv.append(str(tiny_pool["pretrained"]))
    before = file_digests(tiny_pool["db"], tiny_pool["pretrained"])
    assert main_preprocessing(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("nothing trained: every part asked for is already in ")
    assert "--retrain" in out and "new --db and --pretrained" in out
    assert file_digests(tiny_pool["db"], tiny_pool["pretrained"]) == before  # the manifest too


def test_the_readme_build_command_on_the_shipped_pool_trains_and_writes_nothing(tmp_path, data_root, capsys):
    """``--profile cpu --device cpu`` over (copies of) the shipped pool and Oracle: every stage is there."""
    db, pre = tmp_path / "DB_PoE", tmp_path / "DB_pretrained"
    shutil.copytree(ROOT / "DB_PoE", db)
    shutil.copytree(ROOT / "DB_pretrained", pre)
    before = file_digests(db, pre)
    capsys.readouterr()
    argv = ["--profile", "cpu", "--device", "cpu", "--data_root", str(data_root), "--db", str(db)]
    argv += ["--pretrained", str(pre)]
    assert main_preprocessing(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("nothing trained"), out
    assert file_digests(db, pre) == before


def test_the_smoke_profile_trains_one_epoch_on_a_subset_and_flags_still_override(tmp_path):
    from PoE.cli.preprocessing import preprocessing_parser, preprocessing_settings

    def settings(*argv: str):
        a = preprocessing_parser().parse_args([*argv, "--device", "cpu", "--db", str(tmp_path / "db")])
        a.argv = []
        return preprocessing_settings(a)

    s = settings("--profile", "smoke").training
    assert (s.train_limit, s.test_limit, s.oracle.epochs, s.library.epochs, s.experts.epochs) == (2500, 2000, 1, 1, 1)
    assert s.oracle_arch == "wrn-10-1" and len(settings("--profile", "smoke").plan.tasks) == 20  # the whole pipeline
    given = settings("--profile", "smoke", "--train_limit", "100", "--test_limit", "500").training
    assert (given.train_limit, given.test_limit) == (100, 500)
    cpu = settings("--profile", "cpu").training
    assert cpu.train_limit is None and cpu.test_limit is None


def test_stage_alone_without_its_inputs_says_what_to_run(tmp_path, data_root, capsys):
    rc = main_preprocessing(
        [
            *TINY,
            "--data_root",
            str(data_root),
            "--db",
            str(tmp_path / "db"),
            "--pretrained",
            str(tmp_path / "pre"),
            "--stages",
            "experts",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "oracle.pt" in err and "--stages oracle" in err
    assert not (tmp_path / "db").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stages", "warmup"], "invalid choice: 'warmup'"),
        (["--profile", "fast"], "invalid choice: 'fast'"),
        (["--tasks", "people", "martians"], "unknown task 'martians'"),
        (["--dataset", "svhn"], "invalid choice: 'svhn'"),
        (["--oracle_arch", "resnet50"], "--oracle_arch"),
        (["--expert_lr", "-1"], "argument --expert_lr: must be a number > 0 and <= 10, got -1"),
        (["--weight_decay", "-1"], "argument --weight_decay: must be a number >= 0 and < 1, got -1"),
        (["--label_smoothing", "5"], "argument --label_smoothing: must be a number >= 0 and < 1, got 5"),
        # nan and inf compared as in range (nan < 0 is False) and failed late, as a nan loss, or never
        (["--label_smoothing", "nan"], "argument --label_smoothing: must be a number >= 0 and < 1, got nan"),
        (["--weight_decay", "inf"], "argument --weight_decay: must be a number >= 0 and < 1, got inf"),
        (["--oracle_lr", "nan"], "argument --oracle_lr: must be a number > 0 and <= 10, got nan"),
        (["--library_lr", "1e9"], "argument --library_lr: must be a number > 0 and <= 10, got 1e9"),
        (["--T", "nan"], "argument --T: must be a number > 0 and <= 100, got nan"),
        (["--T", "1e6"], "argument --T: must be a number > 0 and <= 100, got 1e6"),
        (["--alpha=-inf"], "argument --alpha: must be a number >= 0 and <= 1000, got -inf"),
        (["--alpha", "NaN"], "argument --alpha: must be a number >= 0 and <= 1000, got NaN"),
        (["--epochs", "two"], "argument --epochs: expected an integer, got 'two'"),
        (["--loss", "hard"], "invalid choice: 'hard'"),
    ],
)
def test_bad_preprocessing_input(tmp_path, capsys, argv, message):
    rc = main_preprocessing([*argv, "--db", str(tmp_path / "db"), "--pretrained", str(tmp_path / "pre")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ resumable training
def toy_problem(seed: int = 0):
    data = torch.Generator().manual_seed(0)  # the same data for every model
    x, y = torch.randn(64, 6, generator=data), torch.randint(0, 3, (64,), generator=data)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def batches(epoch: int):
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(64, generator=g)
        for i in range(4):
            idx = perm[i * 16 : (i + 1) * 16]
            yield Batch(x[idx], y[idx], idx, epoch)

    def loss_fn(b: Batch) -> torch.Tensor:
        return nn.functional.cross_entropy(model(b.x), b.y)

    return model, batches, loss_fn


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    stage = StageConfig(epochs=4, lr=0.1, schedule="onecycle")
    straight, batches, loss_fn = toy_problem()
    train_stage(
        "toy", {"m": straight}, loss_fn, Feed(batches, 4, False), stage, CPU, Resume(tmp_path / "a.pt", {"k": 1})
    )

    resumed, batches, loss_fn = toy_problem()

    with pytest.raises(KeyboardInterrupt):
        feed = Feed(stopping_at(2, batches), 4, False)
        train_stage("toy", {"m": resumed}, loss_fn, feed, stage, CPU, Resume(tmp_path / "b.pt", {"k": 1}))
    assert load_checkpoint(tmp_path / "b.pt")["history"]["epochs_done"] == 2
    fresh, batches, loss_fn = toy_problem(seed=123)  # different init: everything must come from the checkpoint
    hist = train_stage(
        "toy", {"m": fresh}, loss_fn, Feed(batches, 4, False), stage, CPU, Resume(tmp_path / "b.pt", {"k": 1})
    )
    assert hist["epochs_done"] == 4
    assert [(r["first_epoch"], r["epochs"]) for r in hist["sittings"]] == [(1, 2), (3, 2)]
    assert all(r["cpu"] and r["precision"] == "fp32" and r["seconds"] > 0 for r in hist["sittings"])
    for a, b in zip(straight.state_dict().values(), fresh.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_file_of_another_run_is_refused(tmp_path):
    model, batches, loss_fn = toy_problem()
    stage = StageConfig(epochs=1, lr=0.1)
    save_checkpoint(tmp_path / "r.pt", {"fingerprint": {"k": 0}, "modules": {}, "optimizer": {}, "history": {}})
    with pytest.raises(PoEError, match="--retrain toy"):
        train_stage(
            "toy", {"m": model}, loss_fn, Feed(batches, 4, False), stage, CPU, Resume(tmp_path / "r.pt", {"k": 1})
        )


# ------------------------------------------------------------------ teacher cache
def test_cached_teacher_logits_equal_running_the_oracle(tmp_path):
    torch.manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (40,)))
    oracle = WideResNet(WRNSpec(10, 1), 10).eval()
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loader = TensorLoader(data, 8, norm, 4, "cpu", Draw(seed=1, view_seed=7))
    cached = TeacherOutputs(oracle, state_id(oracle), 3, 7, tmp_path, CPU, progress=False)
    online = TeacherOutputs(oracle, state_id(oracle), 0, 7, tmp_path, CPU, progress=False)
    for epoch in (0, 1, 4):  # epoch 4 reuses view 1
        for batch in cached.batches(loader, StageConfig(epochs=2, lr=0.1))(epoch):  # makes views 0, 1 ready
            assert batch.view == epoch % 3
            torch.testing.assert_close(cached.logits(batch, loader), online.logits(batch, loader), atol=2e-2, rtol=1e-2)
    assert sorted(p.name[-7:] for p in tmp_path.glob("teacher_*.pt")) == ["0000.pt", "0001.pt"]  # epoch 4: view 1


# ------------------------------------------------------------------ conditional KD on real data
def test_ckd_extracts_an_accurate_expert_from_real_features(tmp_path, official_cifar, data_root, capsys):
    """Teacher = the original release's WRN-16-1 (its library + head), library = its front, frozen.

    Our expert stage, on 6,000 real training images (all classes) for 2 epochs from one cached view of the Oracle's
    logits, must give an expert for vehicles_2 far above the 20% chance level of a 5-class task (65.6% here; 69.8%
    on 8,000 images, 52.0% on 4,000).
    """
    install_stand_in_oracle(official_cifar, tmp_path / "pre", tmp_path / "db")
    db = tmp_path / "db" / "cifar100"
    rc = main_preprocessing(
        [
            "--data_root",
            str(data_root),
            "--db",
            str(tmp_path / "db"),
            "--pretrained",
            str(tmp_path / "pre"),
            "--oracle_arch",
            "wrn-16-1",
            "--stages",
            "experts",
            "--tasks",
            "vehicles_2",
            "--train_limit",
            "6000",
            "--expert_epochs",
            "2",
            "--teacher_views",
            "1",
            "--expert_batch_size",
            "128",
            "--profile",
            "quick",
            "--no_progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    expert = load_checkpoint(db / "experts" / "expert_vehicles_2.pt")
    assert expert["test_n"] == 500
    assert expert["test_acc"] > 50.0, capsys.readouterr().out


def test_a_test_limit_that_leaves_a_task_without_images_is_one_line(tmp_path, official_cifar, data_root, capsys):
    """--test_limit 3 keeps no image of most 5-class tasks: an expert's accuracy over none would be nan%."""
    install_stand_in_oracle(official_cifar, tmp_path / "pre", tmp_path / "db")
    rc = main_preprocessing(
        [
            "--data_root",
            str(data_root),
            "--db",
            str(tmp_path / "db"),
            "--pretrained",
            str(tmp_path / "pre"),
            "--oracle_arch",
            "wrn-16-1",
            "--stages",
            "experts",
            "--tasks",
            "vehicles_2",
            "--train_limit",
            "256",
            "--epochs",
            "1",
            "--teacher_views",
            "1",
            "--test_limit",
            "3",
            "--profile",
            "quick",
            "--no_progress",
            "--device",
            "cpu",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 2 and err.count("\n") == 1 and "--test_limit 3 keeps no test image of classes" in err
    assert "epoch" not in out  # refused before any training
    assert not (tmp_path / "db" / "cifar100" / "experts" / "expert_vehicles_2.pt").exists()


def test_load_split_reads_real_cifar(data_root):
    test = load_split("cifar100", data_root, "test")
    assert test.x.shape == (10000, 3, 32, 32) and test.x.dtype == torch.uint8
    assert torch.bincount(test.y).tolist() == [100] * 100


def test_gpu_profile_runs_whole_on_cpu_on_a_tiny_subset(tmp_path, capsys):
    """--profile gpu (the paper's WRN-40-4 Oracle, WRN-16-1 library, 16-wide experts, cached views) end to end
    with --device cpu on a generated data folder, one epoch per stage: the profile's plumbing, not its speed."""
    root = fake_cifar(tmp_path / "data", 64, 100)
    rc = main_preprocessing(
        [
            "--profile",
            "gpu",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--batch_size",
            "64",
            "--teacher_views",
            "1",
            "--tasks",
            "people",
            "vehicles_2",
            "--no_progress",
            "--data_root",
            str(root),
            "--db",
            str(tmp_path / "db"),
            "--pretrained",
            str(tmp_path / "pre"),
            "--test_limit",
            "1000",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "note: --test_limit 1000 is not below the 100 test images this run reads: all are used" in out.out
    manifest = json.loads((tmp_path / "db" / "cifar100" / "manifest.json").read_text())
    assert manifest["profile"] == "gpu" and manifest["oracle"]["arch"] == "wrn-40-4" and manifest["compile"] == []
    assert set(manifest["experts"]) == {"people", "vehicles_2"}
    assert all(p.stat().st_size <= 16 << 20 for p in (tmp_path / "pre" / "cifar100").glob("oracle.pt*"))
    assert len(list((tmp_path / "pre" / "cifar100").glob("oracle.pt.*"))) == 2  # fp16 WRN-40-4 in two shards


def stopping_in_second_epoch(train_stage_fn, stage: str):
    """``train_stage`` that stops ``stage`` (only) as its second epoch starts, as Ctrl-C would."""

    def train(name, modules, loss_fn, feed, *a, **k):
        feed = dataclasses.replace(feed, batches=stopping_at(1, feed.batches)) if name == stage else feed
        return train_stage_fn(name, modules, loss_fn, feed, *a, **k)

    return train


def test_manifest_says_which_stage_ran_over_several_sittings(tmp_path, monkeypatch, capsys):
    """A run interrupted in the library's second epoch and run again: the manifest lists both sittings of the
    library (epochs, machine, precision) and names it among the resumed stages; the other stages ran once."""
    import PoE.build.stages

    root = fake_cifar(tmp_path / "data", 128, 100)
    args = [
        *GENERATED,
        "--data_root",
        str(root),
        "--db",
        str(tmp_path / "db"),
        "--pretrained",
        str(tmp_path / "pre"),
    ]
    real = PoE.build.stages.base.train_stage
    interrupted = stopping_in_second_epoch(real, "library")

    monkeypatch.setattr(PoE.build.stages.base, "train_stage", interrupted)
    assert main_preprocessing(args) != 0
    monkeypatch.setattr(PoE.build.stages.base, "train_stage", real)
    assert main_preprocessing(args) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "db" / "cifar100" / "manifest.json").read_text())
    sittings = manifest["stage_sittings"]
    assert [(r["first_epoch"], r["epochs"]) for r in sittings["library"]] == [(1, 1), (2, 1)]
    assert len(sittings["oracle"]) == len(sittings["experts"]) == 1 and sittings["experts"][0]["epochs"] == 2
    assert manifest["resumed_stages"] == ["library"]
    assert all(r["cpu"] and r["precision"] == "fp32" for runs in sittings.values() for r in runs)


def test_pools_over_one_library_keep_their_own_expert_progress(tmp_path, monkeypatch, capsys):
    """An ablation pool stopped in its experts' second epoch leaves its progress in its own folder; a second pool
    over the same DB_pretrained trains its experts meanwhile, and the first then resumes to the end."""
    import PoE.build.stages

    root = fake_cifar(tmp_path / "data", 128, 100)
    base = [
        *GENERATED,
        "--data_root",
        str(root),
        "--pretrained",
        str(tmp_path / "pre"),
    ]
    assert main_preprocessing([*base, "--db", str(tmp_path / "db")]) == 0, capsys.readouterr().err
    real = PoE.build.stages.base.train_stage
    interrupted = stopping_in_second_epoch(real, "experts")

    soft = [*base, "--stages", "experts", "--loss", "soft", "--db", str(tmp_path / "soft")]
    scale = [*base, "--stages", "experts", "--loss", "scale", "--db", str(tmp_path / "scale")]
    for pool in ("soft", "scale"):
        (tmp_path / pool / "cifar100").mkdir(parents=True)
        shutil.copy(tmp_path / "db" / "cifar100" / "library_cifar100.pt", tmp_path / pool / "cifar100")
    monkeypatch.setattr(PoE.build.stages.base, "train_stage", interrupted)
    assert main_preprocessing(soft) != 0
    assert (tmp_path / "soft" / "cifar100" / "resume" / "experts.pt").is_file()
    monkeypatch.setattr(PoE.build.stages.base, "train_stage", real)
    assert main_preprocessing(scale) == 0, capsys.readouterr().err
    assert not (tmp_path / "scale" / "cifar100" / "resume").exists()
    assert main_preprocessing(soft) == 0, capsys.readouterr().err
    assert "resuming after epoch 1/2" in capsys.readouterr().out
    assert not (tmp_path / "soft" / "cifar100" / "resume").exists()
    sittings = json.loads((tmp_path / "soft" / "cifar100" / "manifest.json").read_text())["stage_sittings"]
    assert [(r["first_epoch"], r["epochs"]) for r in sittings["experts"]] == [(1, 1), (2, 1)]


def test_a_run_killed_after_a_stages_last_epoch_resumes_instead_of_retraining(tmp_path, monkeypatch, capsys):
    """Killed while the Oracle's outputs were being evaluated (after its last epoch): its resume file used to
    be gone already, and the rerun trained the Oracle again from epoch 1."""
    from PoE.build.preprocess import Evaluator

    root = fake_cifar(tmp_path / "data", 128, 100)
    args = [
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
        str(tmp_path / "pre"),
    ]
    real = Evaluator.evaluate

    def killed(self, *a, **k):
        raise KeyboardInterrupt  # where a kill -9 would stop the process: trained, not yet evaluated or saved

    monkeypatch.setattr(Evaluator, "evaluate", killed)
    assert main_preprocessing(args) != 0
    resume = tmp_path / "pre" / "cifar100" / "resume" / "oracle.pt"
    assert resume.is_file() and not (tmp_path / "pre" / "cifar100" / "oracle.pt").exists()
    assert "[oracle] epoch 1/1" in capsys.readouterr().out
    monkeypatch.setattr(Evaluator, "evaluate", real)
    assert main_preprocessing(args) == 0, capsys.readouterr().err
    assert "[oracle] epoch" not in capsys.readouterr().out  # nothing trained again
    assert (tmp_path / "pre" / "cifar100" / "oracle.pt").is_file() and not resume.parent.exists()
