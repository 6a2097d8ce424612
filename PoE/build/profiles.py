"""Training schedules: a ``StageConfig`` per stage, and the named profiles that set them (``--profile``).

The paper's distillation constants and learning rate are written once here and shared by the profiles and by
the baselines' command lines, and so are the names the command lines offer (stages, precisions): this
module imports no torch, so that ``--help`` answers at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from PoE.core.datasets import DatasetConfig
from PoE.core.errors import PoEError

KD_T = 4.0  # distillation temperature (library, experts, and the baselines that distill)
KD_ALPHA = 0.3  # weight of L_scale in an expert's loss (and of the L1 term of the CKD baseline)
PAPER_LR = 0.1  # the paper's SGD learning rate: every stage of the paper profile, and the baselines
STAGES = ("oracle", "library", "experts")  # preprocessing's stages, in order


@dataclass(frozen=True)
class StageConfig:
    """One training stage: SGD with momentum, step decay (at fractions of the run) or one-cycle."""

    epochs: int
    lr: float
    batch_size: int = 512
    schedule: str = "step"  # "step": x gamma at each milestone; "onecycle": warm-up then cosine to 0
    milestones: tuple[float, ...] = (0.4, 0.8)  # fractions of ``epochs``
    gamma: float = 0.1
    warmup: float = 0.15  # fraction of the run spent warming up (onecycle)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.0

    def lr_at(self, progress: float) -> float:
        """Learning rate after ``progress`` epochs (fractional)."""
        frac = progress / max(self.epochs, 1)
        if self.schedule == "step":
            return self.lr * self.gamma ** sum(frac >= m for m in self.milestones)
        if self.schedule == "onecycle":
            if frac < self.warmup:
                return self.lr * (0.1 + 0.9 * frac / self.warmup)
            t = (frac - self.warmup) / max(1e-8, 1 - self.warmup)
            return self.lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        raise PoEError(f"unknown schedule {self.schedule!r}; known: step, onecycle")


@dataclass(frozen=True)
class Profile:
    """A named set of schedules (``--profile``): the Oracle's network, each stage's schedule, the teacher cache."""

    name: str
    description: str
    oracle_arch: str | None  # None: the dataset's paper Oracle
    oracle: StageConfig
    library: StageConfig
    experts: StageConfig
    T: float = KD_T
    alpha: float = KD_ALPHA
    teacher_views: int = 0  # distinct augmented views whose Oracle logits are cached (0: one per epoch)
    compile: tuple[str, ...] = ()  # stages whose training step is torch.compile'd on CUDA (slower on CPU)
    train_limit: int | None = None  # train on a seeded random subset of this many images (None: all of them)
    test_limit: int | None = None  # score on a seeded random subset of this many test images (None: all of them)


PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        description="the paper's schedules: Oracle and library 200 epochs (x0.1 at 80, 160), experts 100 (40, 80)",
        oracle_arch=None,
        oracle=StageConfig(epochs=200, lr=PAPER_LR),
        library=StageConfig(epochs=200, lr=PAPER_LR),
        experts=StageConfig(epochs=100, lr=PAPER_LR),
    ),
    "quick": Profile(
        name="quick",
        description="to try the pipeline: WRN-16-1 Oracle, one epoch per stage, one cached teacher view",
        oracle_arch="wrn-16-1",
        oracle=StageConfig(epochs=1, lr=0.1, batch_size=256, schedule="onecycle", warmup=0.3),
        library=StageConfig(epochs=1, lr=0.1, batch_size=256, schedule="onecycle", warmup=0.3),
        experts=StageConfig(epochs=1, lr=0.1, batch_size=256, schedule="onecycle", warmup=0.3),
        teacher_views=1,
    ),
    "gpu": Profile(
        name="gpu",
        description="sized for one H100 (under 8 minutes for all three stages): the paper's WRN-40-4 Oracle "
        "80 epochs (torch.compile), library 40, experts 15, one-cycle schedules, Oracle logits cached for 10 "
        "views, bf16",
        oracle_arch=None,
        oracle=StageConfig(epochs=80, lr=0.2, batch_size=512, schedule="onecycle", nesterov=True),
        library=StageConfig(epochs=40, lr=0.2, batch_size=512, schedule="onecycle", nesterov=True),
        experts=StageConfig(epochs=15, lr=0.2, batch_size=512, schedule="onecycle", nesterov=True),
        teacher_views=10,
        compile=("oracle",),
    ),
    "cpu": Profile(
        name="cpu",
        description="sized for 2 CPU cores with native bf16 (100 min measured on 2 AVX512-BF16 cores): WRN-16-2 "
        "Oracle 60 epochs, library 60, experts 40, one-cycle schedules, Oracle logits cached for 6 augmented views, "
        "bf16 where fast",
        oracle_arch="wrn-16-2",
        oracle=StageConfig(epochs=60, lr=0.2, batch_size=256, schedule="onecycle", nesterov=True),
        library=StageConfig(epochs=60, lr=0.2, batch_size=256, schedule="onecycle", nesterov=True),
        experts=StageConfig(epochs=40, lr=0.1, batch_size=256, schedule="onecycle", nesterov=True),
        teacher_views=6,
    ),
    "smoke": Profile(
        name="smoke",
        description="a smoke run, to check the whole pipeline in minutes, not to get a useful pool: WRN-10-1 "
        "Oracle, one epoch per stage on 2,500 training images, every part scored on 2,000 test images",
        oracle_arch="wrn-10-1",
        oracle=StageConfig(epochs=1, lr=0.1, batch_size=256, schedule="onecycle", warmup=0.3),
        library=StageConfig(epochs=1, lr=0.1, batch_size=256, schedule="onecycle", warmup=0.3),
        experts=StageConfig(epochs=1, lr=0.1, batch_size=256, schedule="onecycle", warmup=0.3),
        teacher_views=1,
        train_limit=2500,
        test_limit=2000,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise PoEError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def for_dataset(profile: Profile, cfg: DatasetConfig) -> Profile:
    """``profile`` as it applies to ``cfg``: a dataset with a pretrained Oracle keeps that Oracle and runs it on
    every batch (streamed augmentations cannot be cached per view); the paper profile takes the dataset's
    own expert schedule when the paper gives one (ImageNet: 20 epochs, lr 0.01, x0.1 at 10 and 15). A dataset of
    MobileNetV2 networks trained here (a folder of large images) trains its own Oracle, not the profile's WRN."""
    if not cfg.networks.pretrained:
        return profile if cfg.family == "wrn" else replace(profile, oracle_arch=None)
    experts = replace(profile.experts, **cfg.networks.expert_stage) if profile.name == "paper" else profile.experts
    return replace(profile, oracle_arch=None, teacher_views=0, experts=experts)


def override(stage: StageConfig, **changes: object) -> StageConfig:
    """``stage`` with the non-None ``changes`` applied."""
    return replace(stage, **{k: v for k, v in changes.items() if v is not None})
