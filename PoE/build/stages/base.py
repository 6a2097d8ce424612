"""What every stage shares: a finished ``Part`` and the ``Stage`` skeleton (load what fits, make the rest,
report all; train resumably on the stage's schedule)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from PoE.build import distributed
from PoE.build.preprocess import Preprocessor
from PoE.build.profiles import StageConfig
from PoE.build.train import Feed, Resume, compiled, train_stage
from PoE.core.checkpoint import load_checkpoint, unwrap
from PoE.core.errors import PoEError
from PoE.core.loaders import Batch, FolderLoader, TensorLoader


@dataclass
class Part:
    """A finished part (the Oracle, the library, one expert) and the metadata its checkpoint records."""

    module: nn.Module
    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.meta["id"])


class Stage:
    """One stage of a run. A stage names its parts (``keys``), loads a finished one (``load``: None when it must
    be made), makes the others (``make``: train, evaluate, save) and reports each (``report``); ``run`` is the
    order in which every stage does so."""

    name: ClassVar[str]  # as --stages and --retrain name it

    def __init__(self, prep: Preprocessor) -> None:
        self.prep, self.cfg, s = prep, prep.cfg, prep.s
        self.plan, self.places, self.training, self.execution = s.plan, s.places, s.training, s.execution

    @property
    def conf(self) -> StageConfig:
        return self.training.conf(self.name)

    def keys(self) -> list[str]:
        return [self.name]

    @property
    def resume_file(self) -> Path:
        """Where the stage's per-epoch progress waits to be resumed: beside the Oracle, which every pool shares."""
        return self.prep.pretrained / "resume" / f"{self.name}.pt"

    def target(self, key: str) -> Path:
        """The file that making part ``key`` writes (named when it is missing)."""
        raise NotImplementedError

    def load(self, key: str) -> Part | None:
        raise NotImplementedError

    def make(self, todo: list[str]) -> dict[str, Part]:
        raise NotImplementedError

    def report(self, key: str, part: Part) -> None:
        raise NotImplementedError

    def run(self) -> dict[str, Part]:
        """Load every part that is finished and fits; make the others if this stage was asked for; report all."""
        parts = {key: self.load(key) for key in self.keys()}
        todo = [key for key, part in parts.items() if part is None]
        if todo and self.name not in self.plan.stages:
            raise self.missing(todo)
        if todo:
            self.prep.making(todo)
            parts.update(self.make(todo))
            self.drop_progress()  # only now: killed before its outputs were saved, a rerun resumes, not retrains
        for key, part in parts.items():
            self.report(key, part)
        return parts

    def missing(self, todo: list[str]) -> PoEError:
        return PoEError(
            f"missing {self.target(todo[0])}; make it with: python Run_preprocessing.py --dataset {self.cfg.name} "
            f"--stages {self.name}{self.flags(todo)}"
        )

    def flags(self, todo: list[str]) -> str:
        """What else the command that makes ``todo`` must say."""
        return ""

    def finished(self, path: Path, kind: str) -> tuple[dict, dict] | None:
        """(state_dict, meta) of a finished part's checkpoint, or None when it must be (re)made."""
        if self.name in self.plan.retrain or not path.exists():
            return None
        sd, meta = unwrap(load_checkpoint(path), path, kind)
        files = self.prep.files
        if files.is_pool_part(path) and not files.adopt(path, {**meta, "state_dict": sd}, self.name):
            return None  # a pool part the manifest does not list as it is
        return sd, meta

    def start(self, module: nn.Module) -> tuple[nn.Module, TensorLoader | FolderLoader]:
        """``module`` as the training step calls it (under DDP with several processes, compiled when asked) and
        the stage's loader. Seed the stage before building what it trains."""
        loader = self.prep.data.loader(self.name, self.conf)
        return compiled(distributed.wrap(module), self.name in self.training.compile), loader

    def start_weights(self, model: nn.Module, path: Path | None, flag: str) -> str | None:
        """Load ``path`` (``flag``: a whole torchvision MobileNetV2's state dict in a local file, e.g. ImageNet's)
        into ``model`` before training, all but its last linear layer; the file's name, or None (no file: the
        model starts from scratch)."""
        if path is None:
            return None
        from PoE.core.networks.mobilenetv2 import start_from
        from PoE.core.networks.pretrained import imagenet_weights

        sd, source = imagenet_weights("mobilenet_v2", path, flag)
        try:
            start_from(model, sd)
        except ValueError as e:
            raise PoEError(f"{flag} {source}: {e}") from None
        return str(source)

    def drop_progress(self) -> None:
        """Remove the stage's resume file once the parts it trained are evaluated and saved."""
        if distributed.is_main():
            self.resume_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder goes once empty; another run's file keeps it
                self.resume_file.parent.rmdir()

    def train(
        self,
        modules: dict[str, nn.Module],
        loss_fn: Callable[[Batch], torch.Tensor],
        loader: TensorLoader | FolderLoader,
        batches: Callable[[int], Iterator[Batch]],
        fingerprint: dict[str, Any],
        frozen: tuple[nn.Module, ...] = (),
    ) -> dict[str, Any]:
        """Train ``modules`` on the stage's schedule, resuming ``resume_file`` when its fingerprint matches;
        the training part of the parts' metadata."""
        resume = self.resume_file
        if self.name in self.plan.retrain and distributed.is_main():
            resume.unlink(missing_ok=True)
        distributed.barrier()  # no rank reads a resume file rank 0 is about to drop
        conf = self.conf
        fingerprint = {
            "stage": self.name,
            "dataset": self.cfg.name,
            "seed": self.training.seed,
            "config": repr(conf),
            "train_limit": self.training.train_limit,
            **fingerprint,
        }
        feed = Feed(batches, len(loader), self.execution.progress)
        history = train_stage(
            self.name, modules, loss_fn, feed, conf, self.execution.runtime, Resume(resume, fingerprint), frozen
        )
        return {
            "epochs": conf.epochs,
            "config": repr(conf),
            "seed": self.training.seed,
            "train_seconds": history["seconds"],
            "epoch_seconds": history.get("epoch_seconds", []),
            "sittings": history.get("sittings", []),
        }
