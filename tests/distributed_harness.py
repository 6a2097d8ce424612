"""Code that tests/test_distributed.py runs in every process of a two-process (gloo, CPU) job.

As a script under torchrun, ``distributed_harness.py OUT ARG ...`` runs the preprocessing command line
with the ARGs and writes ``OUT/rank<r>.json``: the exit code and, for each trained stage, the content id
of every module this rank held when the stage ended (the ranks must agree; rank 1 writes no files).
``toy_worker`` (started by torch.multiprocessing) trains a small model straight and interrupted+resumed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from PoE.build import distributed
from PoE.build.profiles import StageConfig
from PoE.build.train import Feed, Resume, train_stage
from PoE.core.data import ImageSet, Normalizer
from PoE.core.loaders import Batch, Draw, TensorLoader
from PoE.core.runtime import CPU


def toy_training(resume: Path, stop_at: int | None = None) -> nn.Module:
    """A linear model (no BatchNorm: shards change nothing) trained 3 epochs on this rank's shard of 96 images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = ImageSet(images, torch.randint(0, 4, (96,), generator=g))
    norm = Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    loader = TensorLoader(data, 16, norm, 2, "cpu", Draw(seed=3, rank=distributed.rank(), world=distributed.world()))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4))
    net = distributed.wrap(model)

    def loss_fn(b: Batch) -> torch.Tensor:
        return F.cross_entropy(net(b.x), b.y)

    def batches(epoch: int):
        if epoch == stop_at:
            raise KeyboardInterrupt
        return loader.epoch(epoch)

    stage = StageConfig(epochs=3, lr=0.1, schedule="onecycle")
    train_stage("toy", {"m": model}, loss_fn, Feed(batches, len(loader), False), stage, CPU, Resume(resume, {"toy": 1}))
    return model


def toy_worker(index: int, port: int, out: str) -> None:
    """One of two ranks: a straight run, then a run stopped before epoch 3 and resumed; saves both weights."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE="2"
    )
    distributed.setup(torch.device("cpu"))
    try:
        folder = Path(out)
        straight = toy_training(folder / "straight.pt")
        try:
            toy_training(folder / "resumed.pt", stop_at=2)
        except KeyboardInterrupt:
            distributed.barrier()  # rank 0 has written epoch 2's resume file before it stopped
        resumed = toy_training(folder / "resumed.pt")
        torch.save({"straight": straight.state_dict(), "resumed": resumed.state_dict()}, folder / f"toy{index}.pt")
        distributed.finish()
    finally:
        distributed.destroy()


def finish_worker(index: int, port: int, out: str) -> None:
    """Rank 0 fails after the last collective (it never reaches ``finish``); rank 1 finished: it waits at most
    ``finish``'s bound, then leaves, and records how long it waited."""
    import time
    from datetime import timedelta

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE="2"
    )
    distributed.setup(torch.device("cpu"))
    distributed.barrier()  # the last collective both ranks reach
    if index == 0:
        time.sleep(6)  # failing, say, while it writes the manifest; then gone without a barrier
    else:
        start = time.monotonic()
        distributed.finish(timedelta(seconds=1))
        Path(out, "waited.txt").write_text(f"{time.monotonic() - start:.2f}")
    distributed.destroy()


def main(out: Path, argv: list[str]) -> int:
    import PoE.build.stages.base as stages
    from PoE.cli import main_preprocessing
    from PoE.core.checkpoint import state_id

    ids: dict[str, dict[str, str]] = {}

    def recording(name, modules, *args, **kwargs):  # train_stage, noting what each rank ends the stage with
        history = train_stage(name, modules, *args, **kwargs)
        ids[name] = {k: state_id(m) for k, m in modules.items()}
        return history

    stages.train_stage = recording
    rank = os.environ["RANK"]  # read now: the process group is gone when main_preprocessing returns
    rc = main_preprocessing(argv)
    (out / f"rank{rank}.json").write_text(json.dumps({"rc": rc, "ids": ids}))
    return rc


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
