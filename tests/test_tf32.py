"""The TF32 switches of a CUDA run, on any machine: they exist on CPU builds too, so the state that broke export
on CUDA (cuDNN conv and RNN set apart through torch's newer ``fp32_precision`` API) is made here without a GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from PoE import SHIPPED_POOL
from PoE.core.precision import ieee_fp32, ieee_scope, resolve
from PoE.query.pool import Pool

TASKS = ["people", "vehicles_1"]


def switches() -> tuple:
    b = torch.backends
    return b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision


@contextlib.contextmanager
def restored() -> Iterator[None]:
    """Every switch as it was after the test, whatever it did (the test process runs other tests after)."""
    was = switches()
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
        b = torch.backends
        b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision, b.cuda.matmul.fp32_precision = was


@pytest.fixture(scope="module")
def model():
    return Pool.open(SHIPPED_POOL / "cifar100").query(TASKS)


def test_resolving_a_cuda_precision_changes_no_switch():
    with restored():
        before = switches()
        assert resolve("fp32", torch.device("cuda")) == "fp32"
        assert switches() == before


def test_ieee_scope_turns_tf32_off_for_fp32_on_cuda_only_and_restores():
    with restored():
        before = switches()
        with ieee_scope("cuda", "fp32"):
            assert not torch._C._get_cudnn_allow_tf32()  # conv and RNN: IEEE, and torch can read it
            assert torch.backends.cudnn.conv.fp32_precision != "tf32"
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert switches() == before
        for device, precision in (("cpu", "fp32"), ("cuda", "bf16")):
            with ieee_scope(device, precision):
                assert switches() == before


@pytest.mark.parametrize("where", ["after a CUDA run's switches", "inside the fp32 scope"])
def test_export_with_the_switches_a_cuda_run_sets(model, tmp_path, where):
    with restored():
        if where == "after a CUDA run's switches":  # what resolving fp32 on CUDA did to the whole process
            torch.backends.cudnn.conv.fp32_precision = "ieee"
            torch.backends.cuda.matmul.fp32_precision = "ieee"
        before = switches()
        with ieee_scope("cuda", "fp32") if where == "inside the fp32 scope" else contextlib.nullcontext():
            model.export(tmp_path / "q.pt2")
        assert switches() == before
    program = torch.export.load(str(tmp_path / "q.pt2")).module()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(program(x), model.logits(x), atol=1e-4)


def test_nested_scopes_restore_the_outer_state():
    with restored():
        with ieee_fp32():
            inner = switches()
            with ieee_fp32():
                pass
            assert switches() == inner
