"""Train-free knowledge consolidation: library + queried experts -> one task-specific model."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from PoE.config import DatasetConfig
from PoE.errors import PoEError
from PoE.hierarchy import Query
from PoE.networks import build_library, expert_from_state
from PoE.store import PoolPaths, load_checkpoint, load_into, unwrap


class TaskSpecificModel(nn.Module):
    """The shared library once, every queried expert on its features, logits in ascending class id."""

    def __init__(self, library: nn.Module, experts: list[nn.Module], query: Query) -> None:
        super().__init__()
        self.library = library
        self.experts = nn.ModuleList(experts)
        self.tasks = list(query.tasks)
        self.classes = query.classes
        self.register_buffer("order", torch.tensor(query.order, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.library(x)
        logits = torch.cat([e(features) for e in self.experts], dim=1)
        return logits.index_select(1, self.order)


class RawInput(nn.Module):
    """Wraps a model so it takes float RGB in [0, 1] and normalises it itself (for export)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def how_to_make(cfg: DatasetConfig, task: str | None = None) -> str:
    what = f"--stages experts --tasks {task}" if task else "--stages library"
    return f"create it with: python Run_preprocessing.py --dataset {cfg.name} {what}"


def load_library(pool: PoolPaths, cfg: DatasetConfig) -> nn.Module:
    path = pool.library
    sd, meta = unwrap(load_checkpoint(path, how_to_make(cfg)), path, "library")
    if meta and meta.get("dataset") not in (None, cfg.name):
        raise PoEError(f"{path} is a library for {meta.get('dataset')}, not {cfg.name}")
    try:
        library = build_library(cfg, sd)
    except ValueError as e:
        raise PoEError(f"{path} does not hold a {cfg.name} library ({e})") from None
    return load_into(library, sd, path, f"{cfg.name} library")


def load_expert(pool: PoolPaths, cfg: DatasetConfig, task: str, in_channels: int) -> nn.Module:
    path = pool.expert(task)
    sd, meta = unwrap(load_checkpoint(path, how_to_make(cfg, task)), path, "expert")
    want = cfg.tasks[task]
    if meta and (meta.get("task") != task or list(meta.get("classes", want)) != list(want)):
        raise PoEError(f"{path} holds the expert of {meta.get('task')!r} {meta.get('classes')}, not {task!r} {want}")
    try:
        expert = expert_from_state(sd)
    except ValueError as e:
        raise PoEError(f"{path} does not hold an expert ({e})") from None
    if expert.num_classes != len(want) or expert.in_channels != in_channels:
        raise PoEError(
            f"{path} does not fit: it has {expert.num_classes} outputs on {expert.in_channels} input channels, "
            f"task {task!r} needs {len(want)} outputs on the library's {in_channels} channels"
        )
    return load_into(expert, sd, path, f"expert of {task!r}")


@dataclass
class Built:
    model: TaskSpecificModel
    load_ms: float  # reading the library and experts off disk
    assemble_ms: float  # putting them together (the consolidation proper)

    @property
    def build_ms(self) -> float:
        return self.load_ms + self.assemble_ms


def build_from_pool(pool: PoolPaths, cfg: DatasetConfig, query: Query, device: str | torch.device = "cpu") -> Built:
    """Load the library and the queried experts and consolidate them; no training, no data."""
    t0 = time.perf_counter()
    library = load_library(pool, cfg)
    experts = [load_expert(pool, cfg, t, library.out_channels) for t in query.tasks]
    t1 = time.perf_counter()
    model = TaskSpecificModel(library, experts, query).to(device).eval()
    t2 = time.perf_counter()
    return Built(model, (t1 - t0) * 1e3, (t2 - t1) * 1e3)
