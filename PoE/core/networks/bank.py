"""The expert bank: G experts of one family held as one network, one kernel per layer instead of G.

A bank has an expert's architecture with every channel count multiplied by G: its convolutions are grouped
(``groups=G``, each expert's filters one group) or, where every expert reads the same input, one wide
convolution; its BatchNorms are one BatchNorm over all experts' channels; its classifier is ``BankLinear``,
every expert's linear layer in one batched product (experts may have different class counts). So a bank's
state dict has an expert's keys, each tensor the experts' tensors concatenated along dim 0 (``bank_state``),
and an expert is written back as its slice (``expert_states``). In training mode the per-channel BatchNorm
statistics are those of the separate experts, so training a bank is training its experts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

COUNTER = "num_batches_tracked"  # a BatchNorm's scalar step counter: one value for the whole bank
# Devices where a WRN bank runs as grouped convolutions. On a CPU the grouped form was slower than the per-expert
# loop (docs/expert_bank.md): the G-fold repeated features leave the caches.
GROUPED_ON = {"cuda"}


def grouped_on(device: torch.device) -> bool:
    """Whether banks run grouped convolutions on ``device`` (else expert by expert, on the same tensors)."""
    return device.type in GROUPED_ON


class BankLinear(nn.Module):
    """The final linear layers of G experts (``width`` features each; ``classes[g]`` outputs for expert g) as
    one batched product. Computed in fp32 even under autocast, as an expert's own ``fc`` is (``fp32_linear``).

    ``weight`` is the experts' ``fc.weight`` stacked (sum(classes) x width); output column j is
    ``features[:, owner[j]] . weight[j] + bias[j]``: experts' logits side by side, in bank order."""

    def __init__(self, width: int, classes: Sequence[int]) -> None:
        super().__init__()
        self.width, self.classes = width, list(classes)
        total = sum(self.classes)
        self.weight = nn.Parameter(torch.empty(total, width))
        self.bias = nn.Parameter(torch.zeros(total))
        owner = [g for g, c in enumerate(self.classes) for _ in range(c)]  # real even on the meta device
        self.register_buffer("owner", torch.tensor(owner, dtype=torch.long, device="cpu"), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: N x (G * width)
        with torch.autocast(x.device.type, enabled=False):
            rows = x.float().unflatten(1, (len(self.classes), self.width)).index_select(1, self.owner)
            return torch.einsum("ncw,cw->nc", rows, self.weight.float()) + self.bias.float()


def bank_state(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The state dict of a bank of experts with these state dicts (same family and shape, any class counts)."""
    keys = list(states[0])
    if any(list(s) != keys for s in states):
        raise ValueError("experts of different architectures cannot share a bank")
    out = {}
    for k in keys:
        ts = [s[k] for s in states]
        out[k] = torch.stack(ts).max() if k.endswith(COUNTER) else torch.cat(ts)
    return out


def expert_states(bank: nn.Module) -> list[dict[str, torch.Tensor]]:
    """Each expert's state dict, sliced from ``bank``'s (a copy): a ``BankLinear``'s tensors split by its class
    counts, every other tensor in G equal parts (G experts), a step counter given to each."""
    heads = [(name, m) for name, m in bank.named_modules() if isinstance(m, BankLinear)]
    g = len(heads[0][1].classes)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(g)]
    for k, v in bank.state_dict().items():
        v = v.detach()
        head = next((m for name, m in heads if k.startswith(name + ".")), None)
        parts = [v] * g if k.endswith(COUNTER) else v.split(head.classes) if head else v.chunk(g)
        for e, part in zip(out, parts, strict=True):
            e[k] = part.clone()
    return out


_TEMPLATES: OrderedDict[tuple, nn.Module] = OrderedDict()  # the last 256 bank shapes, per device
_LOCK = threading.Lock()


def template(key: tuple, build: Callable[[], nn.Module], device: torch.device) -> nn.Module:
    """The empty bank of shape ``key`` (``build`` makes it): parameters on the meta device, buffers that are
    not part of its state (``BankLinear.owner``) on ``device``. Cached, so only a new shape pays for building."""
    with _LOCK:  # the service builds models on request threads while its batcher builds banks
        if key not in _TEMPLATES:
            with torch.device("meta"):
                bank = build()
            for m in bank.modules():
                for name, b in m._buffers.items():
                    if b is not None and not b.is_meta:
                        m._buffers[name] = b.to(device)
            _TEMPLATES[key] = bank
            while len(_TEMPLATES) > 256:
                _TEMPLATES.popitem(last=False)
        _TEMPLATES.move_to_end(key)
        return _TEMPLATES[key]


def assemble(template: nn.Module, state: dict[str, torch.Tensor], requires_grad: bool) -> nn.Module:
    """A new module of ``template``'s structure (built once, on the meta device, its non-persistent buffers on the
    state's device) holding ``state``'s tensors as they are, shared, not copied. Constructing modules runs their
    initialisers, some milliseconds for a bank; copying the structure and placing the tensors takes tens of
    microseconds."""
    bank = _structure(template)
    for name, t in state.items():
        module_name, _, attr = name.rpartition(".")
        m = bank.get_submodule(module_name)
        if attr in m._parameters:
            m._parameters[attr] = nn.Parameter(t, requires_grad=requires_grad)
        else:
            m._buffers[attr] = t
    return bank


def _structure(module: nn.Module) -> nn.Module:
    """A copy of ``module`` and its submodules, whose parameter, buffer, module and hook tables are its own (their
    tensors still those of ``module``, to be replaced)."""
    new = object.__new__(type(module))
    new.__dict__ = {k: (v.copy() if isinstance(v, dict) else v) for k, v in module.__dict__.items()}
    new._modules = {k: None if m is None else _structure(m) for k, m in module._modules.items()}
    return new
