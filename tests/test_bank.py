"""The expert bank computes what the separate experts compute: logits on real images, training, storage."""

from __future__ import annotations

import copy

import pytest
import torch

import PoE.core.networks.bank as bank_module
from PoE.build.losses import ckd_loss
from PoE.core.data import Normalizer
from PoE.core.datasets import load_split
from PoE.core.networks import MobileNetLibrary, WRNLibrary, WRNSpec, bank_of, mobilenetv2, unbank, wrn
from PoE.query.pool import Pool

from .conftest import ROOT, need, shared_dir


def features_of(pool: Pool, data_root, n: int = 256) -> torch.Tensor:
    test = load_split(pool.cfg.name, data_root, "test", progress=False)
    x = Normalizer(pool.cfg.mean, pool.cfg.std, "cpu")(test.x[:n]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return pool.library(x)


@pytest.fixture(params=["grouped", "per_expert"])
def form(request, monkeypatch) -> str:
    """Both ways a WRN bank runs: grouped convolutions (on a GPU) and expert by expert on slices (on a CPU)."""
    monkeypatch.setattr(bank_module, "GROUPED_ON", {"cpu", "cuda"} if request.param == "grouped" else set())
    return request.param


@pytest.mark.parametrize("where", ["shipped", "original"])
def test_bank_logits_equal_the_experts_on_real_images(where, form, data_root, official_cifar):
    pool = Pool.open(ROOT / "DB_PoE" if where == "shipped" else official_cifar, "cifar100")
    tasks = list(pool.experts)
    assert len(tasks) == (20 if where == "shipped" else 6)  # every expert each pool holds
    f = features_of(pool, data_root)
    with torch.no_grad():
        loop = torch.cat([pool.experts[t](f) for t in tasks], 1)
        bank = pool.bank(tasks)(f)
    diff = (bank - loop).abs().max().item()
    print(f"{where}, {form}: {len(tasks)} experts, max |bank - loop| = {diff:.2e} over {loop.numel()} logits")
    assert diff <= 1e-4
    assert torch.equal(bank.argmax(1), loop.argmax(1))


def test_tinyimagenet_bank_with_experts_of_unequal_size(form):
    root = need(shared_dir() / "official" / "tinyimagenet")
    pool = Pool.open(root, "tinyimagenet")
    tasks = list(pool.experts)
    assert len({pool.experts[t].num_classes for t in tasks}) > 1  # the bank's fc handles unequal class counts
    torch.manual_seed(0)
    f = torch.randn(8, pool.library.out_channels, 16, 16)
    with torch.no_grad():
        loop = torch.cat([pool.experts[t](f) for t in tasks], 1)
        assert (pool.bank(tasks)(f) - loop).abs().max().item() <= 1e-4


def test_a_bank_gives_back_each_expert_as_its_own_slice():
    lib = WRNLibrary(WRNSpec(16, 1))
    experts = [wrn.new_expert(lib, 16, c) for c in (5, 3, 7)]
    states = unbank(bank_of(experts))
    for e, s in zip(experts, states, strict=True):
        assert s.keys() == e.state_dict().keys()
        assert all(torch.equal(s[k], v) for k, v in e.state_dict().items())
        assert all(v._base is None or v.numel() == v._base.numel() for v in s.values())  # own storage, not a view


def test_a_bank_of_the_same_shape_on_another_device_has_its_index_there():
    """A bank's structure is cached per shape; the cache once ignored the device, so a query on the GPU after one on
    the CPU got the CPU's ``owner`` index and failed (found on an H200). The meta device stands in for the GPU."""
    lib = WRNLibrary(WRNSpec(16, 1))
    experts = [wrn.new_expert(lib, 16, c) for c in (5, 3)]
    assert bank_of(experts).fc.owner.device.type == "cpu"
    assert bank_of([e.to("meta") for e in experts]).fc.owner.device.type == "meta"


def test_mobilenet_bank_equals_its_experts():
    torch.manual_seed(0)
    lib = MobileNetLibrary(split=4)
    experts = [mobilenetv2.new_expert(lib, 8, c).eval() for c in (4, 2, 3)]
    for e in experts:  # non-trivial BatchNorm statistics
        e.conv[1].running_mean.uniform_(-1, 1)
        e.conv[1].running_var.uniform_(0.5, 2)
    f = torch.randn(5, lib.out_channels, 7, 7)
    with torch.no_grad():
        loop = torch.cat([e(f) for e in experts], 1)
        torch.testing.assert_close(bank_of(experts)(f), loop, rtol=0, atol=1e-5)


def test_one_training_step_of_the_bank_equals_the_loop(form):
    """Loss and every gradient of one conditional-KD step, bank against separate experts (fp32, train mode)."""
    torch.manual_seed(0)
    lib = WRNLibrary(WRNSpec(16, 1)).eval()
    sizes = [5, 5, 3]
    experts = [wrn.new_expert(lib, 16, c) for c in sizes]
    bank = bank_of(copy.deepcopy(experts))
    f = torch.randn(16, 32, 16, 16)
    teacher = torch.randn(16, sum(sizes)) * 4
    ends = torch.tensor(sizes).cumsum(0).tolist()

    def losses(outs):
        parts = zip(outs, sizes, ends, strict=True)
        return torch.stack([ckd_loss(o, teacher[:, e - c : e], 4.0, 10.0) for o, c, e in parts]).sum()

    loop_loss = losses([e(f) for e in experts])
    loop_loss.backward()
    out = bank(f)
    bank_loss = losses([out[:, e - c : e] for c, e in zip(sizes, ends, strict=True)])
    bank_loss.backward()
    torch.testing.assert_close(bank_loss, loop_loss, rtol=1e-6, atol=1e-6)
    grads = {k: [] for k, _ in experts[0].named_parameters()}
    for e in experts:
        for k, p in e.named_parameters():
            grads[k].append(p.grad)
    for k, p in bank.named_parameters():
        torch.testing.assert_close(p.grad, torch.cat(grads[k]), rtol=1e-5, atol=1e-6)
    for e, state in zip(experts, unbank(bank), strict=True):  # the BatchNorm statistics moved as the experts' did
        for k, b in e.named_buffers():
            torch.testing.assert_close(state[k], b, rtol=1e-5, atol=1e-6)


def test_query_model_is_one_library_and_one_bank(data_root):
    pool = Pool.open(ROOT / "DB_PoE", "cifar100")
    model = pool.query(["people", "vehicles_1", "vehicles_2"])
    assert [name for name, _ in model.module.named_children()] == ["library", "bank"]
    assert model.module.bank.fc.weight.shape == (15, 16)
    shared = pool.experts["people"].fc.weight
    assert torch.equal(model.module.bank.fc.weight[:5], shared)
