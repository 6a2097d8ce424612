"""Network definitions and the builders that pick one per architecture.

``wrn-<depth>-<widen>`` names this project's wide ResNets (CIFAR-100, Tiny-ImageNet); any other name is a
torchvision classification model (ImageNet: ``wide_resnet101_2`` Oracle, ``mobilenet_v2`` library).
"""

from __future__ import annotations

import torch
from torch import nn

from PoE.datasets import DatasetConfig
from PoE.networks import mobilenetv2, wrn
from PoE.networks.mobilenetv2 import MobileNetExpert, MobileNetLibrary
from PoE.networks.wrn import WideResNet, WRNExpert, WRNLibrary, WRNSpec, library_spec_from_state

__all__ = [
    "MobileNetExpert",
    "MobileNetLibrary",
    "WRNExpert",
    "WRNLibrary",
    "WRNSpec",
    "WideResNet",
    "build_library",
    "build_network",
    "check_arch",
    "expert_from_state",
    "is_wrn",
    "new_expert",
]


def is_wrn(arch: str) -> bool:
    return arch.lower().startswith("wrn-")


def check_arch(arch: str, cfg: DatasetConfig) -> None:
    """Raise ValueError unless ``arch`` can be ``cfg``'s Oracle: a WRN where the Oracle is trained here, a
    torchvision classification model where it comes pretrained (ImageNet)."""
    if not cfg.pretrained:
        WRNSpec.parse(arch)
        return
    import torchvision

    if arch not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"the {cfg.name} Oracle must be a torchvision classification model (e.g. wide_resnet101_2, resnet18), "
            f"got {arch!r}"
        )


def build_network(arch: str, cfg: DatasetConfig) -> nn.Module:
    """A whole network over all of ``cfg``'s classes (Oracle or library student), freshly initialised."""
    if is_wrn(arch):
        return WideResNet(WRNSpec.parse(arch, cfg.first_stride), cfg.num_classes)
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=cfg.num_classes)


def build_library(cfg: DatasetConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """An empty library shaped like ``state_dict`` (weights are loaded by the caller)."""
    if cfg.library_arch == "mobilenet_v2":
        return mobilenetv2.library_from_state(state_dict)
    return WRNLibrary(library_spec_from_state(state_dict, cfg.first_stride))


def new_expert(library: nn.Module, width: int, num_classes: int) -> nn.Module:
    """A freshly initialised expert of ``library``'s family that sits on its features."""
    if isinstance(library, MobileNetLibrary):
        return mobilenetv2.new_expert(library, width, num_classes)
    return wrn.new_expert(library, width, num_classes)


def expert_from_state(state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """An (untrained) expert shaped like ``state_dict``: a WRN block3 expert or a MobileNetV2 one."""
    if "conv.0.weight" in state_dict:
        return mobilenetv2.expert_from_state(state_dict)
    return wrn.expert_from_state(state_dict)
