"""Network definitions behind one interface per family (``Family``), and the builders that pick one.

A family is how a pool's library and experts are built: ``wrn`` (this project's wide ResNets, CIFAR-100 and
Tiny-ImageNet) and ``mobilenetv2`` (ImageNet's library and experts, and those of a folder of large images).
Each provides its library, expert, expert bank, the baselines' target network and the folding done for export;
a checkpoint records its family. Whole
networks (Oracle, library student) are ``wrn-<depth>-<widen>``, ``mobilenet_v2[-<width>]`` (trained here) or,
for a dataset that comes pretrained (ImageNet), any torchvision classification model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from PoE.core.datasets import DatasetConfig
from PoE.core.networks import mobilenetv2, wrn
from PoE.core.networks.bank import assemble, bank_state, expert_states, template
from PoE.core.networks.mobilenetv2 import MobileNetBank, MobileNetExpert, MobileNetLibrary
from PoE.core.networks.wrn import WideResNet, WRNBank, WRNExpert, WRNLibrary, WRNSpec, library_spec_from_state

__all__ = [
    "FAMILIES",
    "Family",
    "MobileNetBank",
    "MobileNetExpert",
    "MobileNetLibrary",
    "WRNBank",
    "WRNExpert",
    "WRNLibrary",
    "WRNSpec",
    "WideResNet",
    "bank_of",
    "build_network",
    "check_arch",
    "family_of",
    "family_of_state",
    "unbank",
]


@dataclass(frozen=True)
class Family:
    """What stages, pools and baselines need of a network family, so that none of them dispatches on names."""

    name: str  # recorded as ``family`` in every library and expert checkpoint
    library_from_state: Callable[[dict[str, torch.Tensor], DatasetConfig], nn.Module]  # empty, shaped like it
    new_expert: Callable[[nn.Module, int, int], nn.Module]  # (library, width, classes): initialised
    expert_from_state: Callable[[dict[str, torch.Tensor]], nn.Module]  # empty, shaped like it
    bank_like: Callable[[Sequence[nn.Module]], nn.Module]  # an empty bank shaped like these experts
    target_network: Callable[[DatasetConfig, int, int, nn.Module | None], nn.Module]  # baselines (cfg, n, K, front)
    fold: Callable[[nn.Module], nn.Module]  # in place, eval mode, before export
    expert_key: str  # a key that every expert state dict of this family holds
    expert_type: type[nn.Module]
    min_input: int = 8  # the smallest image side its networks take (an exported program's least dynamic size)


def _wrn_target(cfg: DatasetConfig, n_tasks: int, num_classes: int, front: nn.Module | None) -> nn.Module:
    spec = WRNSpec.parse(cfg.networks.library_arch, cfg.networks.first_stride)
    if front is None:
        front = WRNLibrary(spec)
        wrn.init_weights(front)
    head = WRNExpert(spec.widths[2], cfg.networks.expert_width * n_tasks, num_classes, spec.blocks_per_group)
    wrn.init_weights(head)
    return nn.Sequential(front, head)


def _mobilenet_target(cfg: DatasetConfig, n_tasks: int, num_classes: int, front: nn.Module | None) -> nn.Module:
    if front is None:
        front = MobileNetLibrary(width=mobilenetv2.arch_width(cfg.networks.library_arch) or 1.0)
        mobilenetv2.init_mobilenet(front)
    return nn.Sequential(front, mobilenetv2.new_expert(front, cfg.networks.expert_width * n_tasks, num_classes))


FAMILIES: dict[str, Family] = {
    "wrn": Family(
        "wrn",
        lambda sd, cfg: WRNLibrary(library_spec_from_state(sd, cfg.networks.first_stride)),
        wrn.new_expert,
        wrn.expert_from_state,
        WRNBank.like,
        _wrn_target,
        wrn.fold_batchnorm,
        "block3.layer.0.conv1.weight",
        WRNExpert,
    ),
    "mobilenetv2": Family(
        "mobilenetv2",
        lambda sd, cfg: mobilenetv2.library_from_state(sd),
        mobilenetv2.new_expert,
        mobilenetv2.expert_from_state,
        MobileNetBank.like,
        _mobilenet_target,
        mobilenetv2.fold_batchnorm,
        "conv.0.weight",
        MobileNetExpert,
        min_input=33,  # five stride-2 layers: a smaller side ends at 0 pixels
    ),
}


def family_of(cfg: DatasetConfig) -> Family:
    """The family of ``cfg``'s library and experts."""
    return FAMILIES[cfg.family]


def family_of_state(state_dict: dict[str, torch.Tensor], meta: dict | None = None) -> Family:
    """The family a checkpoint records, or (the original release's bare files) the one whose keys it holds."""
    name = (meta or {}).get("family")
    if name is not None:
        if name not in FAMILIES:
            raise ValueError(f"unknown network family {name!r}; known: {', '.join(FAMILIES)}")
        return FAMILIES[name]
    return next((f for f in FAMILIES.values() if f.expert_key in state_dict), FAMILIES["wrn"])


def bank_of(experts: Sequence[nn.Module], states: Sequence[dict[str, torch.Tensor]] | None = None) -> nn.Module:
    """One bank computing what ``experts`` compute, in this order, in their mode (train or eval). Its tensors are
    the experts' concatenated: new ones, which train apart from the experts (``unbank`` gives the slices back).
    ``states``: the experts' state dicts where the caller holds them (a pool does: a bank then builds in well
    under a millisecond)."""
    states = [e.state_dict() for e in experts] if states is None else states
    state = bank_state(states)
    e, training = experts[0], experts[0].training
    family = next(f for f in FAMILIES.values() if isinstance(e, f.expert_type))
    classes = tuple(x.num_classes for x in experts)
    device = next(iter(state.values())).device  # in the key: the structure and ``owner`` are built for it
    key = (family.name, e.in_channels, e.width, getattr(e, "n_blocks", 0), classes, training, str(device))
    empty = template(key, lambda: family.bank_like(experts).train(training), device)
    return assemble(empty, state, requires_grad=training)


def unbank(bank: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The state dict of each expert of ``bank`` (made by ``bank_of``), as tensors of its own."""
    return expert_states(bank)


def is_wrn(arch: str) -> bool:
    return arch.lower().startswith("wrn-")


def check_arch(arch: str, cfg: DatasetConfig) -> None:
    """Raise ValueError unless ``arch`` can be ``cfg``'s Oracle: a WRN or a MobileNetV2 where the Oracle is
    trained here, a torchvision classification model where it comes pretrained (ImageNet)."""
    if not cfg.networks.pretrained:
        if mobilenetv2.arch_width(arch) is None:
            try:
                WRNSpec.parse(arch)
            except ValueError as e:
                raise ValueError(f"{e}, or mobilenet_v2[-<width>] (e.g. mobilenet_v2-0.5)") from None
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
        return WideResNet(WRNSpec.parse(arch, cfg.networks.first_stride), cfg.num_classes)
    width = mobilenetv2.arch_width(arch)
    if width is not None and not cfg.networks.pretrained:  # a pretrained dataset's loads torchvision's own key names
        return mobilenetv2.MobileNetV2(cfg.num_classes, width)
    import torchvision

    return torchvision.models.get_model(arch, weights=None, num_classes=cfg.num_classes)
