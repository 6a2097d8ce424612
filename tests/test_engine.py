"""The server's onnxruntime engine: the same answers as the torch copies, sessions made beside the serving."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from PoE.core.errors import PoEError
from PoE.query.pool import Pool
from PoE.query.service.batching import ExportGate, Job, forward, served
from PoE.query.service.engine import Engine, chosen

from .api import QUERY
from .conftest import ROOT


def test_the_engine_is_onnx_only_for_fp32_on_a_cpu():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert chosen("auto", cpu, "fp32") == "onnx"
    assert chosen("auto", cpu, "bf16") == chosen("auto", cuda, "fp32") == "torch"
    assert chosen("torch", cpu, "fp32") == "torch"
    with pytest.raises(PoEError, match="--engine onnx runs fp32 on a CPU"):
        chosen("onnx", cuda, "fp32")
    with pytest.raises(PoEError, match="unknown engine 'tvm'; known: auto, torch, onnx"):
        chosen("tvm", cpu, "fp32")


def test_sessions_answer_as_the_torch_copies_on_real_images(data_root):
    """The README query's 1,500 test images: until the sessions are made (asked for after two forwards) torch
    answers; then the sessions do, with the same argmax and logits within 1e-4 (compared: their softmax)."""
    pool = Pool.open(ROOT / "DB_PoE")  # its own pool: served() keeps one set of copies per pool
    model = pool.query(QUERY)
    d = np.load(data_root / "cifar100" / "test.npz")
    keep = np.flatnonzero(np.isin(d["y"], model.classes))
    x = torch.from_numpy(d["x"][keep]).permute(0, 3, 1, 2).float().div(255)
    assert len(x) == 1500
    engine = Engine(ExportGate(), threads=1, after=2)
    try:
        torch_answer = torch.cat([p.probabilities for p in forward(pool, [Job(model, x)], engine)])
        assert engine.made == 0 and engine.jobs.empty()  # one forward: not yet worth an export
        forward(pool, [Job(model, x[:1])], engine)  # the second: every module of the query is asked for
        run = served(pool)
        deadline = time.monotonic() + 120
        while engine.made < 1 + len(QUERY) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert engine.made == 1 + len(QUERY)  # the library and the three experts
        assert run.library in run.sessions and all(run.expert(pool, t) in run.sessions for t in QUERY)
        onnx_answer = torch.cat([p.probabilities for p in forward(pool, [Job(model, x)], engine)])
    finally:
        engine.close()
    assert torch.equal(onnx_answer.argmax(1), torch_answer.argmax(1))
    assert (onnx_answer - torch_answer).abs().max() < 1e-5
    assert not torch.equal(onnx_answer, torch_answer)  # another engine did answer


def test_uint8_pixels_beside_float_images_in_one_batch(pool, images):
    """The service hands the batcher uint8 pixels (scaled with the whole batch, off the event loop); a request of
    [0, 1] floats in the same batch is scaled alike: each answer is the one its model gives alone."""
    model = pool.query(QUERY)
    pixels = torch.from_numpy(images[:3]).permute(0, 3, 1, 2)  # as Service.pixels gives them: channels-last uint8
    floats = torch.from_numpy(images[3:5]).permute(0, 3, 1, 2).float().div(255)
    preds = forward(pool, [Job(model, pixels), Job(model, floats), Job(model, pixels[:1])])
    for pred, x in zip(preds, (pixels, floats, pixels[:1]), strict=True):
        torch.testing.assert_close(pred.probabilities, model.predict(x).probabilities, rtol=0, atol=1e-5)
