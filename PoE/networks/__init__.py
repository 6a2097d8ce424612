"""Network definitions and the builders that pick one per dataset."""

from __future__ import annotations

import torch
from torch import nn

from PoE.config import DatasetConfig
from PoE.networks.wrn import (
    WideResNet,
    WRNExpert,
    WRNLibrary,
    WRNSpec,
    expert_from_state,
    library_spec_from_state,
    new_expert,
)

__all__ = [
    "WRNExpert",
    "WRNLibrary",
    "WRNSpec",
    "WideResNet",
    "build_library",
    "build_network",
    "expert_from_state",
    "new_expert",
]


def build_network(arch: str, cfg: DatasetConfig) -> nn.Module:
    """A whole network over all of ``cfg``'s classes (Oracle or library student), freshly initialised."""
    return WideResNet(WRNSpec.parse(arch, cfg.first_stride), cfg.num_classes)


def build_library(cfg: DatasetConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """An empty library shaped like ``state_dict`` (weights are loaded by the caller)."""
    return WRNLibrary(library_spec_from_state(state_dict, cfg.first_stride))
