"""Wide residual networks (pre-activation), split into a library front and an expert back.

Parameter names follow the common WideResNet code (``conv1``, ``block1.layer.0.bn1``, ...,
``block3``, ``bn1``, ``fc``) so the original Pool of Experts checkpoints load unchanged:
a library holds ``conv1``/``block1``/``block2`` and an expert (or the library student's head)
holds ``block3``/``bn1``/``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from PoE.core.networks.bank import BankLinear, grouped_on
from PoE.core.precision import fp32_linear

MAX_PARAMS = 200_000_000  # a WRN's size limit: its weights, gradients and momentum take 2.4 GB in fp32


class BasicBlock(nn.Module):
    """Pre-activation basic block; the 1x1 shortcut (when widths differ) sees relu(bn1(x)). With ``groups`` G,
    G such blocks side by side (channel counts are totals; each block's channels are one group)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        g = groups
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False, groups=g)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False, groups=g)
        self.equal_in_out = in_planes == out_planes and stride == 1
        shortcut = nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False, groups=g)
        self.convShortcut = None if self.equal_in_out else shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(o)
        o = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return o + shortcut

    def forward_slice(self, x: torch.Tensor, i: int, g: int) -> torch.Tensor:
        """Block ``i`` of the ``g`` side by side, alone, on its own input (slices of the shared tensors)."""
        o = F.relu(bn_slice(self.bn1, x, i, g))
        shortcut = x if self.convShortcut is None else conv_slice(self.convShortcut, o, i, g)
        o = conv_slice(self.conv1, o, i, g)
        o = o if isinstance(self.bn2, nn.Identity) else bn_slice(self.bn2, o, i, g)  # folded for export
        return conv_slice(self.conv2, F.relu(o), i, g) + shortcut


def bn_slice(bn: nn.BatchNorm2d, x: torch.Tensor, i: int, g: int) -> torch.Tensor:
    """BatchNorm ``bn``'s i-th of g channel groups on ``x`` (its running statistics updated in place in training)."""
    c = bn.num_features // g
    s = slice(i * c, (i + 1) * c)
    stats = bn.running_mean is not None
    return F.batch_norm(
        x,
        bn.running_mean[s] if stats else None,
        bn.running_var[s] if stats else None,
        bn.weight[s],
        bn.bias[s],
        bn.training or not stats,
        bn.momentum or 0.0,
        bn.eps,
    )


def conv_slice(conv: nn.Conv2d, x: torch.Tensor, i: int, g: int) -> torch.Tensor:
    """Grouped convolution ``conv``'s i-th group alone, on that group's input ``x``."""
    c = conv.out_channels // g
    bias = None if conv.bias is None else conv.bias[i * c : (i + 1) * c]
    return F.conv2d(x, conv.weight[i * c : (i + 1) * c], bias, conv.stride, conv.padding)


class NetworkBlock(nn.Module):
    """A group of ``n`` basic blocks; only the first changes width and stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, groups: int = 1) -> None:
        super().__init__()
        widths = [(in_planes, stride)] + [(out_planes, 1)] * (n - 1)
        self.layer = nn.Sequential(*[BasicBlock(w, out_planes, s, groups) for w, s in widths])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass(frozen=True)
class WRNSpec:
    """Shape of a WRN-depth-widen; ``first_stride`` 2 for 64x64 inputs (Tiny-ImageNet)."""

    depth: int
    widen: int
    first_stride: int = 1

    def __post_init__(self) -> None:
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {self.depth}")
        if self.widen < 1:
            raise ValueError(f"WRN widen factor must be >= 1, got {self.widen}")
        if self.approx_params > MAX_PARAMS:
            raise ValueError(
                f"{self.name} would hold about {self.approx_params / 1e6:,.0f}M parameters, over the limit of "
                f"{MAX_PARAMS / 1e6:.0f}M (wrn-28-10 holds 37M): give a smaller depth or widen factor"
            )

    @property
    def approx_params(self) -> int:
        """Its 3x3 convolutions' weights, counted as if every one were full width (a few % above the true
        count), known before anything is allocated."""
        return 18 * self.blocks_per_group * sum(w * w for w in self.widths[1:])

    @property
    def blocks_per_group(self) -> int:
        return (self.depth - 4) // 6

    @property
    def widths(self) -> tuple[int, int, int, int]:
        k = self.widen
        return 16, 16 * k, 32 * k, 64 * k

    @property
    def name(self) -> str:
        return f"wrn-{self.depth}-{self.widen}"

    @staticmethod
    def parse(text: str, first_stride: int = 1) -> WRNSpec:
        """``'wrn-40-4'`` -> WRNSpec(40, 4)."""
        parts = text.lower().split("-")
        if (
            len(parts) != 3
            or parts[0] != "wrn"
            or not all(p.isascii() and p.isdigit() and len(p) <= 6 for p in parts[1:])
        ):
            raise ValueError(f"architecture must look like wrn-<depth>-<widen> (e.g. wrn-40-4), got {text!r}")
        return WRNSpec(int(parts[1]), int(parts[2]), first_stride)


class WRNLibrary(nn.Module):
    """conv1 + block1 + block2 of a WRN: the shared front of every task-specific model."""

    def __init__(self, spec: WRNSpec) -> None:
        super().__init__()
        w, n = spec.widths, spec.blocks_per_group
        self.spec = spec
        self.conv1 = nn.Conv2d(3, w[0], 3, spec.first_stride, 1, bias=False)
        self.block1 = NetworkBlock(n, w[0], w[1], 1)
        self.block2 = NetworkBlock(n, w[1], w[2], 2)
        self.out_channels = w[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(self.conv1(x)))


class WRNExpert(nn.Module):
    """block3 + BN + ReLU + global average pool + fc: one expert, or the library student's head."""

    def __init__(self, in_channels: int, width: int, num_classes: int, n_blocks: int) -> None:
        super().__init__()
        self.block3 = NetworkBlock(n_blocks, in_channels, width, 2)
        self.bn1 = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)
        self.in_channels, self.width, self.num_classes, self.n_blocks = in_channels, width, num_classes, n_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(self.block3(x)))
        return fp32_linear(self.fc, F.adaptive_avg_pool2d(o, 1).flatten(1))


class WRNBank(nn.Module):
    """G experts (``WRNExpert``, on the same library features) as one network: the features repeated G times
    along channels (every expert's first BatchNorm sees them), then block3 with ``groups=G``, one BatchNorm over
    all G * width channels and ``BankLinear``. Output: the experts' logits side by side, in bank order.

    Where the grouped form is slower (``bank.grouped_on``: on a CPU it is), the same weights run expert by expert
    through slices of the bank's tensors (``per_expert``): the experts' features stay small enough for the caches,
    where the G-fold repeated ones do not."""

    def __init__(self, in_channels: int, width: int, classes: Sequence[int], n_blocks: int) -> None:
        super().__init__()
        g = self.groups = len(classes)
        self.block3 = NetworkBlock(n_blocks, in_channels * g, width * g, 2, g)
        self.bn1 = nn.BatchNorm2d(width * g)
        self.fc = BankLinear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not grouped_on(x.device):
            return self.fc(self.per_expert(x))
        x = x.repeat(1, self.groups, 1, 1) if self.groups > 1 else x
        o = F.relu(self.bn1(self.block3(x)))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))

    def per_expert(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features of every expert, computed one expert at a time on slices of the bank's tensors (the
        same function as the grouped form; in training the BatchNorm statistics move the same way)."""
        g, pooled = self.groups, []
        for i in range(g):
            o = x
            for block in self.block3.layer:
                o = block.forward_slice(o, i, g)
            o = F.relu(bn_slice(self.bn1, o, i, g))
            pooled.append(F.adaptive_avg_pool2d(o, 1).flatten(1))
        if self.training:  # once per step, as the grouped form counts
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked is not None:
                    m.num_batches_tracked.add_(1)
        return torch.cat(pooled, 1)

    @staticmethod
    def like(experts: Sequence[WRNExpert]) -> WRNBank:
        e = experts[0]
        return WRNBank(e.in_channels, e.width, [x.num_classes for x in experts], e.n_blocks)


class WideResNet(nn.Module):
    """A whole WRN = library front + back of width 64*widen over all classes."""

    def __init__(self, spec: WRNSpec, num_classes: int) -> None:
        super().__init__()
        self.spec = spec
        self.front = WRNLibrary(spec)
        self.back = WRNExpert(spec.widths[2], spec.widths[3], num_classes, spec.blocks_per_group)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.back(self.front(x))


def init_weights(module: nn.Module) -> None:
    """He init for convs, unit BN, zero biases (the usual WRN initialisation)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


def new_expert(library: WRNLibrary, width: int, num_classes: int) -> WRNExpert:
    """A freshly initialised expert that sits on ``library``'s features."""
    e = WRNExpert(library.out_channels, width, num_classes, library.spec.blocks_per_group)
    init_weights(e)
    return e


def _layer_count(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    ids = {k[len(prefix) :].split(".")[0] for k in state_dict if k.startswith(prefix)}
    return len([i for i in ids if i.isdigit()])


def library_spec_from_state(state_dict: dict[str, torch.Tensor], first_stride: int) -> WRNSpec:
    """Read a library's WRN shape off its weights (the stride is not visible in shapes: pass it)."""
    try:
        n = _layer_count(state_dict, "block1.layer.")
        width2 = state_dict["block2.layer.0.conv1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a WRN library state dict (no {e})") from None
    if n < 1 or width2 % 32:
        raise ValueError("not a WRN library state dict (unexpected block layout)")
    return WRNSpec(6 * n + 4, width2 // 32, first_stride)


def expert_from_state(state_dict: dict[str, torch.Tensor]) -> WRNExpert:
    """An (untrained) expert shaped like ``state_dict``."""
    try:
        conv = state_dict["block3.layer.0.conv1.weight"]
        classes = state_dict["fc.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"not an expert state dict (no {e})") from None
    return WRNExpert(conv.shape[1], conv.shape[0], classes, _layer_count(state_dict, "block3.layer."))


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold each basic block's bn2 (eval mode) into the conv1 it follows, in place: the same function with one
    elementwise pass less per block, for exported inference graphs. bn1 sits after a residual sum and stays."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for block in module.modules():
        if isinstance(block, BasicBlock) and isinstance(block.bn2, nn.BatchNorm2d):
            block.conv1 = fuse_conv_bn_eval(block.conv1.eval(), block.bn2.eval())
            block.bn2 = nn.Identity()
    return module
