"""The CUDA path: the same batches, teacher logits and predictions as on the CPU, bf16, torch.compile, no
host synchronisation per training step, and a whole (tiny) preprocessing run. Skipped without a GPU (CI
has none); run on one with ``python -m pytest -m cuda``."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from PoE.build.profiles import StageConfig
from PoE.build.teacher import TeacherOutputs
from PoE.build.train import Feed, compiled, train_stage
from PoE.cli import main_preprocessing, main_service
from PoE.core.checkpoint import state_id
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import get_dataset, load_split
from PoE.core.evaluate import predict
from PoE.core.loaders import Draw, TensorLoader
from PoE.core.networks import WideResNet, WRNSpec
from PoE.core.precision import resolve
from PoE.core.query import make_query
from PoE.core.runtime import CPU, Runtime
from PoE.query.pool import Pool

from .conftest import fake_cifar

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")
NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def random_images(n: int, classes: int = 10, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (n,), generator=g),
    )


def test_auto_precision_is_bf16_on_the_gpu():
    assert resolve("auto", CUDA) == "bf16" and resolve("fp32", CUDA) == "fp32"


def test_gpu_loader_draws_the_cpu_loader_batches():
    data = random_images(300)
    cpu = TensorLoader(data, 64, Normalizer(*NORM), 4, "cpu", Draw(seed=3))
    gpu = TensorLoader(data, 64, Normalizer(*NORM, device=CUDA), 4, CUDA, Draw(seed=3))
    for a, b in zip(cpu.epoch(1), gpu.epoch(1), strict=True):
        assert b.x.is_cuda and b.index.is_cuda
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.y, b.y.cpu())
        torch.testing.assert_close(a.x, b.x.cpu(), rtol=0, atol=1e-6)


def count_syncs(fn) -> int:
    """Host synchronisations ``fn`` makes, as CUDA's sync debug mode reports them."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_steps_do_not_wait_for_the_gpu(precision):
    """The syncs of one epoch do not grow with its number of steps: none happens per step."""
    syncs = {}
    for steps in (4, 16):
        data = random_images(64 * steps)
        model = WideResNet(WRNSpec(10, 1), 10).to(CUDA).to(memory_format=torch.channels_last)
        loader = TensorLoader(data, 64, Normalizer(*NORM, device=CUDA), 4, CUDA)

        def loss_fn(b, model=model):
            return nn.functional.cross_entropy(model(b.x), b.y)

        stage = StageConfig(epochs=1, lr=0.05)

        def epoch(loader=loader, model=model, loss_fn=loss_fn, stage=stage) -> None:
            train_stage(
                "toy", {"m": model}, loss_fn, Feed(loader.epoch, len(loader), False), stage, Runtime(CUDA, precision)
            )

        epoch()  # warm-up: cuDNN plans, the allocator
        syncs[steps] = count_syncs(epoch)
    assert syncs[4] == syncs[16], syncs


def test_bf16_training_learns_like_fp32():
    """A small WRN fitting 512 random images: bf16 autocast ends as low as fp32 (same batches, same init)."""
    data = random_images(512, classes=4)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = WideResNet(WRNSpec(10, 1), 4).to(CUDA).to(memory_format=torch.channels_last)
        loader = TensorLoader(data, 64, Normalizer(*NORM, device=CUDA), 0, CUDA)

        def loss_fn(b, model=model):
            return nn.functional.cross_entropy(model(b.x).float(), b.y)

        stage = StageConfig(epochs=30, lr=0.1, schedule="onecycle")
        feed = Feed(loader.epoch, len(loader), False)
        hist = train_stage("toy", {"m": model}, loss_fn, feed, stage, Runtime(CUDA, precision))
        losses[precision] = hist["loss"][-1]
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses["fp32"] < 0.5 and losses["bf16"] < 0.5, losses


def test_compiled_step_computes_the_eager_loss():
    torch.manual_seed(0)
    model = WideResNet(WRNSpec(10, 1), 10).to(CUDA).to(memory_format=torch.channels_last).train()
    x = torch.randn(32, 3, 32, 32, device=CUDA).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (32,), device=CUDA)
    eager = nn.functional.cross_entropy(model(x), y)
    fast = nn.functional.cross_entropy(compiled(model, True)(x), y)
    torch.testing.assert_close(fast, eager, rtol=1e-3, atol=1e-3)


def test_gpu_teacher_cache_equals_the_cpu_oracle(tmp_path):
    data = random_images(200)
    oracle = WideResNet(WRNSpec(10, 1), 10).eval()
    ref_loader = TensorLoader(data, 50, Normalizer(*NORM), 4, "cpu", Draw(seed=1, view_seed=7))
    ref = torch.cat([oracle(b.x) for b in ref_loader.ordered(2)]).detach()
    gpu_oracle = WideResNet(WRNSpec(10, 1), 10).eval()
    gpu_oracle.load_state_dict(oracle.state_dict())
    gpu_oracle = gpu_oracle.to(CUDA).to(memory_format=torch.channels_last)
    loader = TensorLoader(data, 50, Normalizer(*NORM, device=CUDA), 4, CUDA, Draw(seed=1, view_seed=7))
    teacher = TeacherOutputs(gpu_oracle, state_id(oracle), 3, 7, tmp_path, Runtime(CUDA), progress=False)
    for batch in teacher.batches(loader, StageConfig(epochs=3, lr=0.1))(2):
        got = teacher.logits(batch, loader)
        assert got.is_cuda
        torch.testing.assert_close(got.cpu(), ref[batch.index.cpu()], atol=2e-2, rtol=1e-2)


def test_released_pool_predicts_the_same_on_gpu(official_cifar, data_root):
    cfg = get_dataset("cifar100")
    query = make_query(["people", "vehicles_1", "vehicles_2"], cfg.tasks)
    test, _ = load_split("cifar100", data_root, "test").with_classes(query.classes)
    cpu = predict(
        Pool.open(official_cifar).query(query.tasks).module,
        test,
        Normalizer(cfg.mean, cfg.std),
        CPU,
    )
    gpu_model = Pool.open(official_cifar, device=CUDA).query(query.tasks).module
    norm = Normalizer(cfg.mean, cfg.std, CUDA)
    fp32 = predict(gpu_model, test, norm, Runtime(CUDA, "fp32"))
    bf16 = predict(gpu_model, test, norm, Runtime(CUDA, "bf16"))
    assert (fp32 == cpu).float().mean() >= 0.998
    assert (bf16 == cpu).float().mean() >= 0.99


def test_tiny_preprocessing_and_service_on_the_gpu(tmp_path, capsys):
    """Every stage on CUDA with bf16 and torch.compile, on a generated CIFAR-shaped data folder."""
    fake_cifar(tmp_path / "data", 1024, 500)
    db, pre = tmp_path / "db", tmp_path / "pre"
    rc = main_preprocessing(
        [
            "--profile",
            "quick",
            "--oracle_arch",
            "wrn-10-1",
            "--epochs",
            "2",
            "--batch_size",
            "128",
            "--teacher_views",
            "2",
            "--tasks",
            "people",
            "vehicles_1",
            "--no_progress",
            "--device",
            "cuda",
            "--precision",
            "bf16",
            "--data_root",
            str(tmp_path / "data"),
            "--db",
            str(db),
            "--pretrained",
            str(pre),
        ]
    )
    assert rc == 0
    manifest = json.loads((db / "cifar100" / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["machine"]["gpu"]
    capsys.readouterr()
    rc = main_service(
        [
            "--db",
            str(db),
            "--data_root",
            str(tmp_path / "data"),
            "--queriedTask",
            "people",
            "vehicles_1",
            "--json",
            "--device",
            "cuda",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_test"] == 50


def test_fp32_scores_the_readme_query_exactly_as_on_the_cpu(data_root):
    """TF32 is off under fp32: the README query scores 73.00% on the GPU as on the CPU (72.93% with TF32)."""
    from .conftest import ROOT

    test = load_split("cifar100", data_root, "test")
    tasks = ["people", "vehicles_1", "vehicles_2"]
    cpu = Pool.open(ROOT / "DB_PoE").query(tasks).accuracy(test)
    gpu = Pool.open(ROOT / "DB_PoE", device=CUDA).query(tasks).accuracy(test)
    assert gpu == cpu
    assert round(cpu[0], 2) == 73.00


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_query_on_the_gpu_exports_after_gpu_work(tmp_path, data_root, precision):
    """Export after the GPU has scored (the state a CUDA run leaves), from the Pool API and the command line; the
    program (CPU) answers as the GPU model does."""
    from .conftest import ROOT

    test = load_split("cifar100", data_root, "test")
    model = Pool.open(ROOT / "DB_PoE", device=CUDA, precision=precision).query(["people", "vehicles_1"])
    model.accuracy(test)
    model.export(tmp_path / "api.pt2", precision=precision)
    rc = main_service(
        [
            "--db",
            str(ROOT / "DB_PoE"),
            "--data_root",
            str(data_root),
            "--queriedTask",
            "people",
            "vehicles_1",
            "--device",
            "cuda",
            "--precision",
            precision,
            "--export",
            str(tmp_path / "cli.pt2"),
            "--export_precision",
            precision,
        ]
    )
    assert rc == 0
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = model.logits(x)
    for name in ("api.pt2", "cli.pt2"):
        out = torch.export.load(str(tmp_path / name)).module()(x)
        assert out.shape == expected.shape and bool(torch.isfinite(out).all())
        if precision == "fp32":  # bf16 rounds differently on the CPU's and the GPU's kernels
            assert torch.allclose(out, expected, atol=1e-3)
