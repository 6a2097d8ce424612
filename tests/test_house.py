"""The shape of the package: a command reads a pool folder once, and one forward serves every consolidated model."""

from __future__ import annotations

import pytest
import torch

from PoE.cli import main_evaluation, main_service
from PoE.core.consolidate import ConsolidatedNet, Rows, SideBySide, forward
from PoE.core.manifest import Contents

from .conftest import ROOT


@pytest.fixture
def manifest_reads(monkeypatch) -> list[str]:
    """The pool folders whose manifest is read, one entry per read."""
    reads: list[str] = []
    original = Contents.read.__func__

    def counting(cls, paths):
        reads.append(str(paths.root))
        return original(cls, paths)

    monkeypatch.setattr(Contents, "read", classmethod(counting))
    return reads


def test_the_service_command_reads_the_pool_once(manifest_reads, capsys):
    assert main_service(["--db", str(ROOT / "DB_PoE"), "--queriedTask", "people", "--no_eval", "--device", "cpu"]) == 0
    assert len(manifest_reads) == 1
    assert main_service(["--db", str(ROOT / "DB_PoE"), "--list", "--device", "cpu"]) == 0
    assert len(manifest_reads) == 2


def test_the_evaluation_command_reads_the_pool_once(manifest_reads, official_cifar, data_root, tmp_path, capsys):
    argv = ["--db", str(official_cifar), "--data_root", str(data_root), "--tasks", "people", "vehicles_1"]
    assert main_evaluation([*argv, "--n", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert manifest_reads == [str(official_cifar)]


def test_a_batch_of_queries_gets_what_each_model_computes_alone(pool):
    """The service's forward of several queries (experts apart or as one union bank) is each query's own model."""
    torch.manual_seed(0)
    models = [pool.query(q) for q in (["people", "vehicles_1"], ["vehicles_1"], ["trees", "people", "fish"])]
    xs = [torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last) for n in (3, 1, 2)]
    alone = [m.module(x) for m, x in zip(models, xs, strict=True)]
    sizes = {t: n for m in models for t, n in m.module.sizes.items()}
    groups = [Rows(m.tasks, len(x), m.module.order) for m, x in zip(models, xs, strict=True)]

    def apart(tasks, features):
        return torch.cat([pool.experts[t](features) for t in tasks], dim=1)

    def union(tasks, features):
        return pool.bank(list(tasks))(features)

    with torch.no_grad():
        for experts, together in ((apart, False), (union, True)):
            outs = forward(pool.library, experts, sizes, torch.cat(xs), groups, together)
            for got, want in zip(outs, alone, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_the_onnx_form_is_the_same_consolidated_model(pool):
    """Experts as separate branches (what ONNX exports) compute what the bank computes."""
    model = pool.query(["people", "vehicles_2"])
    branches = ConsolidatedNet(pool.library, SideBySide([pool.experts[t] for t in model.tasks]), model.query)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(branches(x), model.module(x), rtol=0, atol=1e-4)


def test_the_package_keeps_its_shape():
    """No import chain deeper than 14 modules, no function over 80 lines or 8 parameters, no record over 15 fields,
    no file over 400 lines (``python scripts/house.py`` lists what is over)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("house", ROOT / "scripts" / "house.py")
    house = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(house)
    assert house.figures(ROOT) == {limit: [] for limit in house.LIMITS}
