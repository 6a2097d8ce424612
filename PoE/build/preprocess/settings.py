"""What one preprocessing run is told, by concern: what to build (``Plan``), where (``Places``), how its parts
are trained (``Training``) and how the run itself goes (``Execution``). ``PoE.cli`` builds them from
Run_preprocessing's flags; each stage reads the parts it needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from PoE.build.profiles import STAGES, Profile, StageConfig
from PoE.core.datasets import DatasetConfig
from PoE.core.runtime import Runtime
from PoE.core.tasks import Hierarchy


@dataclass
class Plan:
    """What to build: the dataset and the tasks of its pool, and which stages may train."""

    cfg: DatasetConfig
    profile: Profile
    tasks: list[str]
    hierarchy: Hierarchy | None = None  # the tasks of cfg, recorded in the pool's manifest
    stages: tuple[str, ...] = STAGES
    retrain: tuple[str, ...] = ()
    adding: bool = False  # --add_tasks: ``tasks`` are new ones, added to the pool in place (``PoE.build.edit``)


@dataclass
class Places:
    """Where the run reads and writes: its folders, and the files a part is, or starts from."""

    data_root: Path
    db: Path  # pool root: the pool is db/<dataset>
    pretrained: Path  # folder of the Oracle and the library student: pretrained/<dataset>
    library_from: Path | None = None  # a pool whose library this pool copies (a new hierarchy on a built library)
    oracle_file: Path | None = None  # the user's Oracle program (PoE.build.oracle), used instead of training one
    oracle_classes: Path | None = None  # its class order, when it differs from the dataset's
    trust_oracle_code: bool = False  # a .pt2 or TorchScript oracle_file is code: loaded only when this says so
    oracle_weights: Path | None = None  # pretrained datasets: the Oracle's state dict (default: torch hub cache)
    library_weights: Path | None = None  # pretrained datasets: a whole MobileNetV2's state dict (ditto)


@dataclass
class Training:
    """How the parts are trained: each stage's schedule, the distillation, the seed and the images seen."""

    oracle_arch: str
    oracle: StageConfig
    library: StageConfig
    experts: StageConfig
    T: float
    alpha: float
    teacher_views: int
    seed: int
    train_limit: int | None = None  # train on a seeded random subset of this many images (smoke tests)
    test_limit: int | None = None  # score on a seeded random subset of this many test images (smoke tests)
    soft: bool = True  # ablation switches for the expert loss
    scale: bool = True
    compile: tuple[str, ...] = ()  # stages whose training step is torch.compile'd

    def conf(self, stage: str) -> StageConfig:
        """The schedule of ``stage`` (a name of ``STAGES``)."""
        return getattr(self, stage)

    def stage_seed(self, stage: str) -> int:
        """Seeds a stage's weights and batch order (augmented views are seeded by ``seed`` alone)."""
        return self.seed * 100 + STAGES.index(stage)


@dataclass
class Execution:
    """How the run goes: where it computes, what it prints, and what the manifest records of its command."""

    runtime: Runtime  # device and resolved precision
    progress: bool = True
    workers: int | None = None  # DataLoader workers of a streamed image folder (default: one per core, <= 8)
    command: str = ""  # the command line, recorded in the manifest
    banner: str = ""  # printed before the first part is made (a run that only loads parts prints none)

    @property
    def device(self) -> torch.device:
        return self.runtime.device


@dataclass
class Settings:
    """Everything one run is told, in its four parts."""

    plan: Plan
    places: Places
    training: Training
    execution: Execution
