"""Where and how a command computes: the device and the resolved precision, as one record.

A command resolves ``--device`` and ``--precision`` once (``Runtime.resolve``) and hands the record down; loops take a
``Runtime`` rather than a device and a precision string, so a forgotten pass-through is a type error, not a silent
fp32 run. Resolving changes no process-wide switch: TF32 and autocast happen only inside ``autocast()`` and
``ieee_scope()``, which restore what they changed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from PoE.core import precision as prec


@dataclass(frozen=True)
class Runtime:
    """A device and a resolved precision (``fp32`` or ``bf16``); ``requested`` is what the user asked for."""

    device: torch.device
    precision: str = "fp32"
    requested: str = "fp32"

    @classmethod
    def resolve(cls, device: torch.device | str = "cpu", precision: str = "fp32") -> Runtime:
        """``auto`` -> the fast precision of ``device``; ``bf16`` where the device cannot run it: a one-line error."""
        device = torch.device(device)
        return cls(device, prec.resolve(precision, device), precision)

    @property
    def fp32(self) -> Runtime:
        """The same device in fp32: what every accuracy a table compares is scored in."""
        return Runtime(self.device, "fp32", "fp32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """A forward's context: bfloat16 autocast for bf16; IEEE fp32 (no TF32) for fp32 on a GPU."""
        return prec.autocast(self.device, self.precision)

    def ieee_scope(self) -> contextlib.AbstractContextManager:
        """A whole training loop's context: for fp32 on a GPU, TF32 off in the backward passes too."""
        return prec.ieee_scope(self.device, self.precision)

    def describe(self) -> str:
        """One line for the log: the precision chosen and why."""
        return prec.describe(self.precision, self.requested, self.device)

    def machine(self) -> dict[str, str]:
        """What a run's times were measured on: CPU model, GPU name, torch version."""
        return prec.machine_info(self.device)


CPU = Runtime(torch.device("cpu"))  # fp32 on the CPU: tests, exports and the default of the Python API
