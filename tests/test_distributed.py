"""Several processes (torchrun, gloo on CPU): sharded batches, DDP-averaged gradients, rank-0-only files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from PoE.build.preprocess import subset_index
from PoE.core.checkpoint import load_checkpoint, load_into, state_id
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import get_dataset, load_split
from PoE.core.errors import PoEError
from PoE.core.evaluate import accuracy
from PoE.core.loaders import Draw, TensorLoader
from PoE.core.networks import build_network
from PoE.core.runtime import CPU
from PoE.query.pool import Pool

from .conftest import ROOT
from .distributed_harness import finish_worker, toy_training, toy_worker
from .servers import free_port

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


def tiny_loader(rank: int = 0, world: int = 1, batch_size: int = 8) -> TensorLoader:
    data = ImageSet(torch.zeros(30, 3, 4, 4, dtype=torch.uint8), torch.zeros(30, dtype=torch.long))
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return TensorLoader(data, batch_size, norm, 1, "cpu", Draw(seed=5, rank=rank, world=world))


def test_ranks_split_each_global_batch_of_a_single_process():
    single = [b.index for b in tiny_loader().epoch(2)]
    shards = [[b.index for b in tiny_loader(r, 2).epoch(2)] for r in (0, 1)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 3  # same steps per epoch: 30 // 8
    for i, whole in enumerate(single):
        a, b = shards[0][i], shards[1][i]
        assert len(a) == len(b) == 4 and not set(a.tolist()) & set(b.tolist())
        assert sorted([*a.tolist(), *b.tolist()]) == sorted(whole.tolist())
    with pytest.raises(PoEError, match="does not split evenly over 2 processes"):
        tiny_loader(0, 2, batch_size=9)


def test_two_ranks_train_like_one_process_and_resume(tmp_path):
    """DDP over rank shards = one process on whole batches (no BatchNorm here), straight or resumed."""
    torch.multiprocessing.spawn(toy_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    single = toy_training(tmp_path / "single.pt").state_dict()
    for index in (0, 1):
        runs = torch.load(tmp_path / f"toy{index}.pt")
        for k, v in single.items():
            torch.testing.assert_close(runs["straight"][k], v, rtol=0, atol=1e-5)
            torch.testing.assert_close(runs["resumed"][k], runs["straight"][k], rtol=0, atol=0)


def test_torchrun_preprocessing_with_two_gloo_processes(tmp_path, few_train_root):
    """Real CIFAR-100 (every 10th training image, stored uncompressed: each rank reads it in a blink)."""
    data_root = few_train_root
    db, pre, out = tmp_path / "db", tmp_path / "pre", tmp_path / "out"
    out.mkdir()
    argv = [
        "--profile",
        "quick",
        "--oracle_arch",
        "wrn-10-1",
        "--train_limit",
        "512",
        "--batch_size",
        "64",
        "--epochs",
        "1",
        "--teacher_views",
        "1",
        "--tasks",
        "people",
        "vehicles_1",
        "--no_progress",
        "--test_limit",
        "2000",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "--data_root",
        str(data_root),
        "--db",
        str(db),
        "--pretrained",
        str(pre),
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(ROOT / "tests" / "distributed_harness.py"),
        str(out),
        *argv,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1)]
    assert [x["rc"] for x in ranks] == [0, 0]
    assert set(ranks[0]["ids"]) == {"oracle", "library", "experts"}
    assert ranks[0]["ids"] == ranks[1]["ids"]  # equal weights and BatchNorm statistics on both ranks
    assert "x 2 processes" in r.stdout and r.stdout.count("[oracle] epoch 1/1") == 1  # rank 0 alone prints

    pool = db / "cifar100"
    oracle = load_checkpoint(pre / "cifar100" / "oracle.pt")
    stored = load_into(build_network("wrn-10-1", get_dataset("cifar100")), oracle["state_dict"], "oracle", "Oracle")
    assert oracle["kind"] == "oracle" and oracle["id"] == state_id(stored)  # the fp16-rounded Oracle, as distilled
    assert load_checkpoint(pre / "cifar100" / "library_student.pt")["oracle_id"] == oracle["id"]
    assert oracle["test_n"] == 2000 and 0.0 <= oracle["test_acc"] <= 100.0
    assert load_checkpoint(pre / "cifar100" / "library_student.pt")["kind"] == "library_student"
    assert load_checkpoint(pool / "library_cifar100.pt")["kind"] == "library"
    cfg = get_dataset("cifar100")
    opened = Pool.open(pool)
    test = load_split("cifar100", data_root, "test")
    test = test.subset(subset_index(len(test), 2000, seed=0 + 1))  # --test_limit's images (seed 0)
    for task in ("people", "vehicles_1"):  # the ranks' shares of the test set add up to a one-process evaluation
        expert = load_checkpoint(pool / "experts" / f"expert_{task}.pt")
        model = torch.nn.Sequential(opened.library, opened.experts[task])
        acc, n = accuracy(model, test, cfg.tasks[task], Normalizer(cfg.mean, cfg.std), CPU)
        assert expert["kind"] == "expert" and 50 < n < 150 and expert["test_n"] == n
        assert expert["test_acc"] == pytest.approx(acc, abs=1e-4)
    assert set(json.loads((pool / "manifest.json").read_text())["experts"]) == {"people", "vehicles_1"}
    assert len(list((pre / "cifar100" / "cache").glob("teacher_*_view0000.pt"))) == 1
    assert not list((pre / "cifar100" / "resume").glob("*.pt"))
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_finished_rank_waits_for_a_failed_one_only_a_bounded_time(tmp_path):
    """``finish``'s barrier is bounded: the rank that finished does not wait out the 2-hour process-group timeout
    for one that failed after the last collective (outside torchrun nothing else would stop it)."""
    torch.multiprocessing.spawn(finish_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    assert float((tmp_path / "waited.txt").read_text()) < 4
