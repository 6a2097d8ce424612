"""Per-dataset configuration and per-profile training schedules.

Datasets differ only by the values here; every stage runs the same code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from PoE.errors import PoEError
from PoE.hierarchy import (
    CIFAR100_CLASSES,
    CIFAR100_DEFAULT,
    CIFAR100_TASKS,
    IMAGENET_DEFAULT,
    IMAGENET_TASKS,
    TINYIMAGENET_CLASSES,
    TINYIMAGENET_DEFAULT,
    TINYIMAGENET_TASKS,
)


@dataclass(frozen=True)
class DatasetConfig:
    name: str  # command-line name and folder under data_root / the pool
    tag: str  # suffix of the original code's file names (library_<tag>.pt)
    num_classes: int
    image_size: int
    crop_pad: int  # zero padding of the random crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tasks: dict[str, list[int]]
    default_tasks: list[str]
    oracle_arch: str  # the paper's Oracle
    library_arch: str  # the WRN whose front is the library
    expert_width: int  # width of an expert's block3
    first_stride: int = 1
    folder: str = ""  # under data_root (default: name)
    reader: str = "npz"  # npz: <folder>/{train,test}.npz; tinyimagenet: the distributed JPEG folder;
    # imagefolder: train/<class>/*, val/<class>/* streamed from disk (too big for memory)
    pretrained: bool = False  # Oracle and library come with ImageNet weights: only the experts are trained
    expert_stage: dict = field(default_factory=dict)  # the paper's expert schedule where it differs (paper profile)
    class_names: tuple[str, ...] = ()  # by class id (ImageNet: torchvision's category names, read on first use)

    def __post_init__(self) -> None:
        if not self.folder:
            object.__setattr__(self, "folder", self.name)

    def class_name(self, class_id: int) -> str:
        if not self.class_names and self.name == "imagenet":
            from torchvision.models import MobileNet_V2_Weights

            object.__setattr__(self, "class_names", tuple(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]))
        return self.class_names[class_id] if class_id < len(self.class_names) else f"class {class_id}"


DATASETS: dict[str, DatasetConfig] = {
    "cifar100": DatasetConfig(
        name="cifar100",
        tag="cifar100",
        num_classes=100,
        image_size=32,
        crop_pad=4,
        # the original code's constants (its released experts expect exactly these)
        mean=(0.5071, 0.4867, 0.4408),
        std=(0.2675, 0.2565, 0.2761),
        tasks=CIFAR100_TASKS,
        default_tasks=CIFAR100_DEFAULT,
        class_names=CIFAR100_CLASSES,
        oracle_arch="wrn-40-4",
        library_arch="wrn-16-1",
        expert_width=16,
    ),
    "tinyimagenet": DatasetConfig(
        name="tinyimagenet",
        tag="TinyImageNet",
        num_classes=200,
        image_size=64,
        crop_pad=8,
        mean=(0.485, 0.456, 0.406),  # ImageNet statistics, as the original code
        std=(0.229, 0.224, 0.225),
        tasks=TINYIMAGENET_TASKS,
        default_tasks=TINYIMAGENET_DEFAULT,
        class_names=TINYIMAGENET_CLASSES,
        oracle_arch="wrn-16-10",
        library_arch="wrn-16-2",
        expert_width=16,
        first_stride=2,
        folder="tiny-imagenet-200",
        reader="tinyimagenet",
    ),
    "imagenet": DatasetConfig(
        name="imagenet",
        tag="ImageNet",
        num_classes=1000,
        image_size=224,  # random resized crop 224 + flip (train); resize 256 + centre crop 224 (test)
        crop_pad=0,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        tasks=IMAGENET_TASKS,
        default_tasks=IMAGENET_DEFAULT,
        oracle_arch="wide_resnet101_2",  # torchvision, ImageNet weights
        library_arch="mobilenet_v2",  # features[:18] of torchvision's, ImageNet weights
        expert_width=80,  # MobileNetV2's 1280-wide last conv narrowed 16x
        reader="imagefolder",
        pretrained=True,
        expert_stage={"epochs": 20, "lr": 0.01, "milestones": (0.5, 0.75)},  # x0.1 at epochs 10 and 15
    ),
}


def get_dataset(name: str) -> DatasetConfig:
    if name not in DATASETS:
        raise PoEError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


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
    name: str
    description: str
    oracle_arch: str | None  # None: the dataset's paper Oracle
    oracle: StageConfig
    library: StageConfig
    experts: StageConfig
    T: float = 4.0
    alpha: float = 0.3
    teacher_views: int = 0  # distinct augmented views whose Oracle logits are cached (0: one per epoch)
    compile: tuple[str, ...] = ()  # stages whose training step is torch.compile'd on CUDA (slower on CPU)


PROFILES: dict[str, Profile] = {
    "paper": Profile(
        name="paper",
        description="the paper's schedules: Oracle and library 200 epochs (x0.1 at 80, 160), experts 100 (40, 80)",
        oracle_arch=None,
        oracle=StageConfig(epochs=200, lr=0.1),
        library=StageConfig(epochs=200, lr=0.1),
        experts=StageConfig(epochs=100, lr=0.1),
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
        description="sized for 2 CPU cores: WRN-16-2 Oracle 12 epochs, library 14, experts 11, one-cycle "
        "schedules, Oracle logits cached for 5 augmented views",
        oracle_arch="wrn-16-2",
        oracle=StageConfig(epochs=12, lr=0.2, batch_size=256, schedule="onecycle", nesterov=True),
        library=StageConfig(epochs=14, lr=0.2, batch_size=256, schedule="onecycle", nesterov=True),
        experts=StageConfig(epochs=11, lr=0.1, batch_size=256, schedule="onecycle", nesterov=True),
        teacher_views=5,
    ),
}


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise PoEError(f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


def for_dataset(profile: Profile, cfg: DatasetConfig) -> Profile:
    """``profile`` as it applies to ``cfg``: a dataset with a pretrained Oracle keeps that Oracle and runs it on
    every batch (streamed augmentations cannot be cached per view); the paper profile takes the dataset's
    own expert schedule when the paper gives one (ImageNet: 20 epochs, lr 0.01, x0.1 at 10 and 15)."""
    if not cfg.pretrained:
        return profile
    experts = replace(profile.experts, **cfg.expert_stage) if profile.name == "paper" else profile.experts
    return replace(profile, oracle_arch=None, teacher_views=0, experts=experts)


def override(stage: StageConfig, **changes: object) -> StageConfig:
    """``stage`` with the non-None ``changes`` applied."""
    return replace(stage, **{k: v for k, v in changes.items() if v is not None})
