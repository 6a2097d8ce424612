"""One training loop for every stage: SGD, per-step schedule, progress bar, resumable epochs.

The loss is summed on the device and read (and checked for NaN) once per epoch; only the progress bar, when it
is shown, reads it more often (every ``SHOW_EVERY`` steps, a wait for the device each time), so without it
(``progress=False``, or on ranks other than 0) the loop waits for the device once per epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from PoE.build import distributed
from PoE.build.profiles import StageConfig
from PoE.core.checkpoint import load_checkpoint, save_checkpoint
from PoE.core.errors import PoEError
from PoE.core.loaders import Batch
from PoE.core.runtime import Runtime


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def compiled(module: nn.Module, on: bool) -> nn.Module:
    """``torch.compile(module)`` when ``on`` (fixed shapes: every training batch has the same size), else
    ``module``. The uncompiled module keeps the weights, so evaluation and saving use it directly."""
    return torch.compile(module, dynamic=False) if on else module


SHOW_EVERY = 50  # steps between progress-bar loss updates (each one waits for the device)


def make_optimizer(params: list[nn.Parameter], stage: StageConfig) -> torch.optim.SGD:
    """SGD; on CUDA the fused kernel (one launch for all parameters) where this torch has it."""
    cuda = bool(params) and params[0].is_cuda
    return torch.optim.SGD(
        params,
        lr=stage.lr,
        momentum=stage.momentum,
        weight_decay=stage.weight_decay,
        nesterov=stage.nesterov,
        fused=True if cuda else None,
    )


@dataclass(frozen=True)
class Feed:
    """What an epoch trains on: ``batches(epoch)`` (so a resumed run sees the data a straight run would), the steps
    in an epoch, and whether a progress bar shows them (on rank 0 only)."""

    batches: Callable[[int], Iterator[Batch]]
    steps: int
    progress: bool = True


@dataclass(frozen=True)
class Resume:
    """Where a stage's weights, optimizer state and history go after every epoch, and what a checkpoint there must
    have been made with (``fingerprint``) to be continued rather than refused."""

    path: Path
    fingerprint: dict[str, Any]


def train_stage(
    name: str,
    modules: dict[str, nn.Module],
    loss_fn: Callable[[Batch], torch.Tensor],
    feed: Feed,
    stage: StageConfig,
    runtime: Runtime,
    resume: Resume | None = None,
    frozen: tuple[nn.Module, ...] = (),
) -> dict[str, Any]:
    """Train ``modules`` (all their parameters) for ``stage.epochs``; return the run's history.

    After every epoch the weights, optimizer state and history go atomically to ``resume.path``; a later call with
    the same fingerprint continues after the last finished epoch. The history's ``sittings`` say which epochs each
    call ran, when, on what machine and at what precision, so a stage finished over several sittings (or machines)
    says so. ``frozen`` modules stay in eval mode (their BatchNorm statistics do not move). ``loss_fn`` runs under
    the runtime's autocast; the backward pass and the optimizer step stay outside it.

    Under several processes ``loss_fn`` must run ``distributed.wrap`` of the modules (so DDP averages
    the gradients) and ``feed`` yield this rank's shard; rank 0 alone prints and writes the checkpoint,
    and at the end every rank holds rank 0's weights and buffers.
    """
    is_main = distributed.is_main()
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = make_optimizer(params, stage)
    history = resumed(name, modules, opt, resume, stage.epochs)
    sitting = new_sitting(history, stage.epochs, runtime)
    with runtime.ieee_scope():  # fp32 on a GPU: IEEE in the backward passes too, not only the forward
        for epoch in range(history["epochs_done"], stage.epochs):
            for m in modules.values():
                m.train()
            for m in frozen:
                m.eval()
            t0 = time.perf_counter()
            bar = tqdm(
                feed.batches(epoch),
                total=feed.steps,
                desc=f"{name} {epoch + 1}/{stage.epochs}",
                leave=False,
                disable=not (feed.progress and is_main),
            )
            epoch_total, count = run_epoch(bar, loss_fn, opt, stage, epoch, feed.steps, runtime)
            if not math.isfinite(epoch_total):
                raise PoEError(f"[{name}] loss became {epoch_total} in epoch {epoch + 1}; lower the learning rate")
            seconds = time.perf_counter() - t0
            epoch_loss = distributed.mean(epoch_total / max(count, 1))  # over all ranks' shards
            record_epoch(history, sitting, epoch, epoch_loss, seconds)
            if is_main:
                print(f"[{name}] epoch {epoch + 1}/{stage.epochs} loss {epoch_loss:.4f} ({seconds:.0f}s)")
                if resume is not None:
                    state = {k: m.state_dict() for k, m in modules.items()}
                    save_checkpoint(
                        resume.path,
                        {
                            "fingerprint": resume.fingerprint,
                            "modules": state,
                            "optimizer": opt.state_dict(),
                            "history": history,
                        },
                    )
    for m in modules.values():
        distributed.broadcast_state(m)
    return history


def new_sitting(history: dict[str, Any], epochs: int, runtime: Runtime) -> dict[str, Any]:
    """This call's record in the history (which epochs it ran, when, where, at what precision), if any is left."""
    sitting: dict[str, Any] = {
        "first_epoch": history["epochs_done"] + 1,
        "epochs": 0,
        "seconds": 0.0,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "precision": runtime.precision,
        **runtime.machine(),
    }
    if history["epochs_done"] < epochs:
        history.setdefault("sittings", []).append(sitting)
    return sitting


def record_epoch(history: dict[str, Any], sitting: dict[str, Any], epoch: int, loss: float, seconds: float) -> None:
    history["epochs_done"] = epoch + 1
    history["loss"].append(loss)
    history["seconds"] += seconds
    history.setdefault("epoch_seconds", []).append(round(seconds, 3))
    sitting["epochs"] += 1
    sitting["seconds"] = round(sitting["seconds"] + seconds, 3)


def resumed(
    name: str, modules: dict[str, nn.Module], opt: torch.optim.Optimizer, resume: Resume | None, epochs: int
) -> dict[str, Any]:
    """The history so far: a new one, or the one in ``resume.path`` (whose weights and optimizer state are loaded
    into ``modules`` and ``opt``) when it was written by a run with the same fingerprint."""
    if resume is None or not resume.path.exists():
        return {"epochs_done": 0, "loss": [], "seconds": 0.0, "epoch_seconds": []}
    resume_path = resume.path
    state = load_checkpoint(resume_path)
    if state.get("fingerprint") != resume.fingerprint:
        raise PoEError(
            f"{resume_path} resumes a different {name} run (its settings or pool differ from these; runs at "
            f"once need their own {resume_path.parent.parent}); pass --retrain {name} to start this stage over, "
            "dropping its progress"
        )
    for key, m in modules.items():
        m.load_state_dict(state["modules"][key])
    opt.load_state_dict(state["optimizer"])
    history = state["history"]
    if distributed.is_main() and history["epochs_done"] < epochs:
        print(f"[{name}] resuming after epoch {history['epochs_done']}/{epochs} ({resume_path})")
    return history


def run_epoch(
    bar: tqdm,
    loss_fn: Callable[[Batch], torch.Tensor],
    opt: torch.optim.Optimizer,
    stage: StageConfig,
    epoch: int,
    steps: int,
    runtime: Runtime,
) -> tuple[float, int]:
    """One epoch's steps; (summed loss, steps). The loss is read from the device once, at the end (and every
    ``SHOW_EVERY`` steps while a progress bar shows it)."""
    device = runtime.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i, batch in enumerate(bar):
        lr = stage.lr_at(epoch + i / steps)
        for group in opt.param_groups:
            group["lr"] = lr
        with runtime.autocast():
            loss = loss_fn(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
        count += 1
        if count % SHOW_EVERY == 0 and not bar.disable:
            bar.set_postfix(loss=f"{total.item() / count:.4f}", lr=f"{lr:.4f}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return total.item(), count
