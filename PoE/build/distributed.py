"""Several training processes under torchrun: one per GPU (NCCL) or several on CPU (gloo).

``torchrun --nproc_per_node=N Run_preprocessing.py ...`` starts N copies of the command; each joins
the process group here, trains on its shard of every batch, and DistributedDataParallel averages the
gradients. Rank 0 alone evaluates, prints and writes files. Without torchrun (no ``WORLD_SIZE`` > 1)
no process group exists and every helper answers as for one process, so plain runs are unchanged.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from PoE.core.errors import PoEError

# Rank 0 alone evaluates and writes teacher caches and checkpoints while the others wait in a barrier.
TIMEOUT = timedelta(hours=2)
FINISH_WAIT = timedelta(minutes=5)  # how long a rank that finished waits for the others (finish)

_device = torch.device("cpu")  # where this process's collectives run (its GPU under NCCL)


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Join the process group when launched as one of several; return the device this process trains on.

    On CUDA every process takes GPU ``LOCAL_RANK`` and the backend is NCCL; on CPU it is gloo.
    """
    global _device
    if not launched():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise PoEError(
                f"process {local} on this node needs GPU cuda:{local}, but only {torch.cuda.device_count()} "
                "are visible; start at most that many processes per node"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT, device_id=device if cuda else None)
    _device = device
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if world() > 1:
        dist.barrier()


def finish(timeout: timedelta = FINISH_WAIT) -> None:
    """At the end of a run that succeeded here: wait (at most ``timeout``) for every rank, so that no rank tears its
    process group down while a peer still holds theirs (once, in the suite, rank 1 of two gloo ranks that reached
    the end first aborted at exit: "terminate called without an active exception"). Bounded: a rank that failed
    after the last collective (rank 0 writing the manifest) never comes, and the others must not wait out the
    2-hour ``TIMEOUT`` (torchrun stops them at once anyway; other launchers may not)."""
    if world() > 1:
        try:
            dist.barrier(async_op=True).wait(timeout=timeout)
        except RuntimeError:  # timed out, or a peer is gone: leave as before
            pass


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module) -> nn.Module:
    """``module`` under DistributedDataParallel when several ranks train it (gradients averaged), else itself.

    Training must call the returned wrapper: DDP only synchronises gradients of forwards that go through it.
    """
    if world() == 1:
        return module
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def broadcast_state(module: nn.Module) -> None:
    """Copy rank 0's weights and buffers into every rank's ``module``.

    DDP keeps the weights equal, but each rank's BatchNorm statistics follow its own shard; after this
    every rank holds exactly the model rank 0 saves.
    """
    if world() == 1:
        return
    for t in module.state_dict().values():  # detached views sharing the module's storage
        buf = t if t.is_contiguous() else t.contiguous()  # e.g. channels_last conv weights
        dist.broadcast(buf, 0)
        if buf is not t:
            t.copy_(buf)


def total(values: list[int]) -> list[int]:
    """Element-wise sums of ``values`` over the ranks (e.g. each rank's correct predictions and images)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=_device)
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]


def mean(value: float) -> float:
    """The average of ``value`` over the ranks (e.g. each rank's loss on its shard)."""
    if world() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device)
    dist.all_reduce(t)
    return t.item() / world()
