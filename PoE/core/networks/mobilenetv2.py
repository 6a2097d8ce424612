"""MobileNetV2 split into a library front and narrow expert backs (the paper's ImageNet pool).

The library is torchvision's ``mobilenet_v2().features[:18]``: every inverted-residual block, up to the
320-channel stage (1.81M parameters), under torchvision's own key names (``features.0.0.weight``, ...), so
torchvision's ImageNet weights load into it unchanged. An expert is the back of MobileNetV2 with the
1280-wide last 1x1 convolution narrowed (``conv``: 1x1 conv + BN + ReLU6), then global average pooling,
dropout and ``fc`` over the task's classes (``classifier.1`` as torchvision names it).

A folder of large images (``--dataset folder``, > 64 pixels) trains its library here: a whole ``MobileNetV2``
(``mobilenet_v2-<width>``: torchvision's width multiplier; its front the library, its back an expert-shaped head
over all classes) is distilled from the Oracle as the WRN library student is, and its front kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import mobilenet_v2
from torchvision.models._utils import _make_divisible
from torchvision.ops import Conv2dNormActivation

from PoE.core.networks.bank import BankLinear
from PoE.core.precision import fp32_linear

LIBRARY_SPLIT = 18  # features[:18]: all inverted-residual blocks; features[18] is the 1280-wide conv
WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.25, 1.3, 1.4, 1.5, 2.0)  # width multipliers a library may have
ARCH = re.compile(r"mobilenet_v2(?:-(\d+(?:\.\d+)?))?")  # mobilenet_v2 (width 1) or mobilenet_v2-<width>


def arch_width(arch: str) -> float | None:
    """The width multiplier ``arch`` names (``mobilenet_v2`` -> 1.0, ``mobilenet_v2-0.5`` -> 0.5); None when
    ``arch`` is not a MobileNetV2; ValueError for a width this module does not build."""
    m = ARCH.fullmatch(arch.lower())
    if m is None:
        return None
    width = float(m.group(1) or 1.0)
    if width not in WIDTHS:
        raise ValueError(f"MobileNetV2 width must be one of {', '.join(map(str, WIDTHS))}, got {arch!r}")
    return width


class MobileNetLibrary(nn.Module):
    """The first ``split`` feature layers of torchvision's MobileNetV2 of ``width``, under torchvision's key
    names."""

    def __init__(self, split: int = LIBRARY_SPLIT, width: float = 1.0) -> None:
        super().__init__()
        full = mobilenet_v2(weights=None, width_mult=width)
        if not 1 <= split <= LIBRARY_SPLIT:
            raise ValueError(f"MobileNetV2 library split must be 1..{LIBRARY_SPLIT}, got {split}")
        self.features = nn.Sequential(*list(full.features)[:split])
        self.split, self.width = split, width
        self.out_channels = _out_channels(self.features[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _out_channels(layer: nn.Module) -> int:
    convs = [m for m in layer.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class MobileNetExpert(nn.Module):
    """MobileNetV2's back with the last conv narrowed to ``width``: 1x1 conv + BN + ReLU6, pool, dropout, fc."""

    def __init__(self, in_channels: int, width: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = Conv2dNormActivation(in_channels, width, kernel_size=1, activation_layer=nn.ReLU6)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(width, num_classes))
        self.in_channels, self.width, self.num_classes = in_channels, width, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropout, fc = self.classifier
        return fp32_linear(fc, dropout(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1)))


class MobileNetBank(nn.Module):
    """G experts (``MobileNetExpert``) as one network: every expert's 1x1 conv reads the same library features,
    so theirs are one conv of G * width filters (one BatchNorm, ReLU6), then pooling and ``BankLinear``."""

    def __init__(self, in_channels: int, width: int, classes: Sequence[int], dropout: float = 0.2) -> None:
        super().__init__()
        self.conv = Conv2dNormActivation(in_channels, width * len(classes), kernel_size=1, activation_layer=nn.ReLU6)
        self.classifier = nn.Sequential(nn.Dropout(dropout), BankLinear(width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))

    @staticmethod
    def like(experts: Sequence[MobileNetExpert]) -> MobileNetBank:
        e = experts[0]
        return MobileNetBank(e.in_channels, e.width, [x.num_classes for x in experts])


class MobileNetV2(nn.Module):
    """A whole MobileNetV2 of ``width`` over ``num_classes``, as torchvision builds it, split in two: ``front``
    (the library) and ``back`` (an expert-shaped head: the 1280-wide conv, pooling, dropout, fc). The library
    student of a folder of large images, and the Oracle trained here for one."""

    def __init__(self, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        self.front = MobileNetLibrary(width=width)
        last = _make_divisible(1280 * max(1.0, width), 8)  # torchvision's last_channel
        self.back = MobileNetExpert(self.front.out_channels, last, num_classes)
        init_mobilenet(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x))


def init_mobilenet(module: nn.Module) -> None:
    """torchvision's MobileNetV2 initialisation (He fan-out convs, unit BN, small normal linear)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def library_from_state(state_dict: dict[str, torch.Tensor]) -> MobileNetLibrary:
    """An empty library with as many feature layers as ``state_dict`` holds, of the width whose shapes it has (a
    whole MobileNetV2's state dict, e.g. torchvision's ImageNet weights, must be cut with ``library_state``
    first)."""
    ids = {int(k.split(".")[1]) for k in state_dict if k.startswith("features.") and k.split(".")[1].isdigit()}
    if not ids or ids != set(range(max(ids) + 1)) or any(not k.startswith("features.") for k in state_dict):
        raise ValueError("not a MobileNetV2 library state dict (expected only features.0 .. features.N keys)")
    split = max(ids) + 1
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for width in WIDTHS:
        with torch.device("meta"):  # shapes only: no weights are initialised
            library = MobileNetLibrary(split, width)
        if {k: tuple(v.shape) for k, v in library.state_dict().items()} == shapes:
            return MobileNetLibrary(split, width)
    raise ValueError(f"no MobileNetV2 of width {', '.join(map(str, WIDTHS))} has these layer shapes")


def library_state(full: dict[str, torch.Tensor], split: int = LIBRARY_SPLIT) -> dict[str, torch.Tensor]:
    """The library's part (``features.0`` .. ``features.<split-1>``) of a whole MobileNetV2 state dict."""
    return {k: v for k, v in full.items() if k.startswith("features.") and int(k.split(".")[1]) < split}


def start_from(model: MobileNetV2, full: dict[str, torch.Tensor]) -> None:
    """Load a whole torchvision MobileNetV2's weights (ImageNet's, from a local file) into ``model``, all but
    the last linear layer (its classes are not the dataset's): the start of a network fine-tuned here. Weights of
    another width are a ValueError."""
    tail = f"features.{LIBRARY_SPLIT}."
    own = {f"front.{k}": v for k, v in library_state(full).items()}
    own |= {"back.conv." + k.removeprefix(tail): v for k, v in full.items() if k.startswith(tail)}
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("back.classifier.")}
    got = {k: tuple(v.shape) for k, v in own.items()}
    if got != want:
        bad = next((k for k in want if got.get(k) != want[k]), None) or next(k for k in got if k not in want)
        raise ValueError(
            f"not the weights of a whole MobileNetV2 of width {model.front.width} ({bad}: "
            f"{got.get(bad)} where {want.get(bad)} is expected)"
        )
    model.load_state_dict(own, strict=False)


def expert_from_state(state_dict: dict[str, torch.Tensor]) -> MobileNetExpert:
    """An (untrained) expert shaped like ``state_dict``."""
    try:
        conv = state_dict["conv.0.weight"]
        classes = state_dict["classifier.1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a MobileNetV2 expert state dict (no {e})") from None
    return MobileNetExpert(conv.shape[1], conv.shape[0], classes)


def new_expert(library: MobileNetLibrary, width: int, num_classes: int) -> MobileNetExpert:
    """A freshly initialised expert that sits on ``library``'s features."""
    e = MobileNetExpert(library.out_channels, width, num_classes)
    init_mobilenet(e)
    return e


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """In place: each BatchNorm2d that directly follows a Conv2d in an ``nn.Sequential`` (torchvision's
    ``Conv2dNormActivation`` blocks) folded into that convolution, eval mode: one elementwise pass less per block,
    for exported graphs and the service's copies."""
    import itertools

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for seq in [m for m in module.modules() if isinstance(m, nn.Sequential)]:
        for a, b in itertools.pairwise(list(seq._modules)):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a], seq._modules[b] = fuse_conv_bn_eval(conv.eval(), bn.eval()), nn.Identity()
    return module
