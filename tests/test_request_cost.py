"""What one prediction costs the server: a tiny batch runs on one torch thread (a larger one on the worker's
threads), and the served modules are private copies with BatchNorm folded into the convolutions, whose answers
equal the pool's own modules' on the README query's 1,500 real CIFAR-100 test images."""

from __future__ import annotations

import asyncio
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import Conv2dNormActivation

from PoE.core.data import Normalizer
from PoE.core.networks import mobilenetv2
from PoE.query.service import batching
from PoE.query.service.batching import TINY_BATCH, Batcher, ExportGate, Job, forward, served

from .api import QUERY


@pytest.fixture(scope="module")
def test_images(pool, data_root) -> torch.Tensor:
    """The README query's test images (float RGB in [0, 1], N x 3 x 32 x 32): 1,500 of them."""
    d = np.load(data_root / "cifar100" / "test.npz")
    keep = np.flatnonzero(np.isin(d["y"], pool.query(QUERY).classes))
    return torch.from_numpy(d["x"][keep]).permute(0, 3, 1, 2).float().div(255)


@pytest.fixture
def threads_seen(monkeypatch) -> list[int]:
    """torch's thread count inside each forward, as the experts run."""
    seen: list[int] = []
    original = batching.consolidated

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(batching, "consolidated", spy)
    before = torch.get_num_threads()
    yield seen
    torch.set_num_threads(before)


def test_a_tiny_batch_runs_on_one_thread_a_larger_one_on_all(pool, test_images, threads_seen):
    torch.set_num_threads(2)
    model = pool.query(QUERY)
    for n in (1, TINY_BATCH, TINY_BATCH + 1, 16):
        forward(pool, [Job(model, test_images[:n])])
    assert threads_seen == [1, 1, 2, 2]
    assert torch.get_num_threads() == 2  # the caller's count is back


def test_the_batcher_thread_takes_the_workers_count(pool, test_images, threads_seen):
    """A thread runs at the count the process had when it first ran an op: the batcher sets the worker's own."""
    torch.set_num_threads(1)  # as another thread may leave the process's default
    batcher = Batcher(ExportGate(), threads=2)
    try:

        async def both() -> None:
            model = pool.query(QUERY)
            await batcher.submit(model, test_images[:16], 1)
            await batcher.submit(model, test_images[:1], 1)

        asyncio.run(both())
    finally:
        batcher.close()
    assert threads_seen == [2, 1]


def count(module: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in module.modules())


def test_served_modules_fold_batchnorm_into_copies_and_agree_on_real_images(pool, test_images):
    states = {k: v.clone() for k, v in pool.library.state_dict().items()}
    run = served(pool)
    assert run.library is not pool.library
    bn_pool, bn_run = count(pool.library, nn.BatchNorm2d), count(run.library, nn.BatchNorm2d)
    assert bn_run < bn_pool, (bn_run, bn_pool)  # each block's bn2 folded into its conv1
    for t in QUERY:
        assert count(run.expert(pool, t), nn.BatchNorm2d) < count(pool.experts[t], nn.BatchNorm2d)
    assert count(pool.library, nn.BatchNorm2d) == bn_pool  # the pool's own modules untouched
    assert all(torch.equal(v, states[k]) for k, v in pool.library.state_dict().items())

    model = pool.query(QUERY)
    assert len(test_images) == 1500
    norm = Normalizer(model.cfg.mean, model.cfg.std, model.device)
    with torch.inference_mode():
        want = torch.cat([model.module(norm(x)) for x in test_images.split(250)])  # the unfolded model's logits
    got = torch.cat([p.probabilities for x in test_images.split(250) for p in forward(pool, [Job(model, x)])])
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert (got - want.softmax(1)).abs().max() < 1e-5
    # the logits themselves: the folded library and experts against the pool's, on the same images
    with torch.inference_mode():
        x = norm(test_images).contiguous(memory_format=torch.channels_last)
        a, b = pool.library(x), run.library(x)
        assert (a - b).abs().max() < 1e-4
        for t in QUERY:
            diff = (pool.experts[t](a) - run.expert(pool, t)(b)).abs().max()
            assert diff < 1e-4, (t, diff)


def test_an_expert_replaced_in_the_pool_is_copied_again(pool):
    run = served(pool)
    old = run.expert(pool, "people")
    replacement = copy.deepcopy(pool.experts["people"])
    original, pool.experts["people"] = pool.experts["people"], replacement
    try:
        assert run.expert(pool, "people") is not old
    finally:
        pool.experts["people"] = original
    assert run.expert(pool, "people") is not old  # and back


def test_a_conv_then_batchnorm_in_a_sequential_is_folded_exactly():
    """MobileNetV2's blocks (torchvision's Conv2dNormActivation): conv, BatchNorm, ReLU6 in an nn.Sequential."""
    torch.manual_seed(0)
    block = Conv2dNormActivation(8, 16, kernel_size=3, activation_layer=nn.ReLU6)
    bn = block[1]
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    block.eval()
    folded = mobilenetv2.fold_batchnorm(copy.deepcopy(block))
    assert count(folded, nn.BatchNorm2d) == 0 and count(block, nn.BatchNorm2d) == 1
    x = torch.randn(4, 8, 12, 12)
    with torch.no_grad():
        assert (folded(x) - block(x)).abs().max() < 1e-5


def test_a_batch_wakes_the_event_loop_once(pool, test_images):
    """Every answer of a batch is handed to the event loop in one call (each call writes to the loop's wake-up
    pipe): four requests in one forward, one call."""
    batcher = Batcher(ExportGate(), max_wait_ms=1000)
    model = pool.query(QUERY)

    async def four() -> list[tuple]:
        loop, calls = asyncio.get_running_loop(), []
        original = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (calls.append(a), original(*a, **k))[1]
        batcher.arrive(1)  # another request is still arriving: the batcher waits for it (up to 1 s)
        jobs = [asyncio.ensure_future(batcher.submit(model, test_images[i : i + 1], 1)) for i in range(4)]
        await asyncio.sleep(0.2)
        batcher.arrive(-1)
        rows = await asyncio.gather(*jobs)
        assert [r[0]["class_id"] for r in rows] == [
            model.predict(test_images[i : i + 1]).class_ids[0] for i in range(4)
        ]
        return calls

    try:
        calls = asyncio.run(four())
    finally:
        batcher.close()
    assert batcher.stats.forwards == 1 and batcher.stats.requests == 4
    assert len(calls) == 1, calls


def test_non_finite_probabilities_are_refused_not_written(pool):
    """The answers are written by orjson, which writes NaN as null: ``answer`` refuses them first (the batcher then
    answers the request with a one-line 500), so no answer carries a NaN as a probability."""
    from PoE.query.model import Prediction
    from PoE.query.service.answers import dumps
    from PoE.query.service.batching import answer

    probabilities = torch.tensor([[0.25, float("nan"), 0.75]])
    with pytest.raises(RuntimeError, match="non-finite probabilities"):
        answer(Prediction([1], ["b"], probabilities, [0, 1, 2], ["a", "b", "c"]), top=2)
    good = answer(Prediction([2], ["c"], probabilities.nan_to_num(0.0), [0, 1, 2], ["a", "b", "c"]), top=2)
    assert (
        dumps(good) == b'[{"class_id":2,"class_name":"c","top":[{"id":2,"name":"c","probability":0.75},'
        b'{"id":0,"name":"a","probability":0.25}]}]'
    )
