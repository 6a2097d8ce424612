"""Training-based ways of getting a task-specific model, to compare with PoE's train-free consolidation.

For a query of n primitive tasks over K classes, every baseline produces the same target network:
a library-shaped front (conv1 + block1 + block2 of the library's WRN) + block3 of width 16n + fc(K),
trained on the composite task's training images (labels are positions in ascending class id).

- scratch:      the whole network, cross-entropy.
- transfer:     PoE's library frozen, a new head, cross-entropy.
- ckd:          PoE's library frozen, a new head, KD from the Oracle's logits on the composite's classes
                (+ alpha * L1), i.e. conditional KD for the composite task itself.
- sd_*:         a whole student distilled from per-task teachers; the student's softmax over all K classes
                is matched to each teacher's softmax, zero-padded to K.
- uhc_*:        as sd, but the student's softmax restricted (renormalised) to each teacher's classes is matched.
  Teachers: *_scratch = one Scratch model per task; *_ckd = PoE's library + that task's expert.

One module per method (its loss and what it trains from), as RepDistiller's ``distiller_zoo``: a new method is
one file here with ``build(name)`` and one line in ``METHODS``. This module imports no torch, so that the command
lines' ``--help`` answers at once; the runner and the methods load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# method name -> the module of this package whose ``build(name)`` makes it; the order is the tables' order
METHODS: dict[str, str] = {
    "scratch": "scratch",
    "transfer": "transfer",
    "ckd": "ckd",
    "sd_scratch": "sd",
    "sd_ckd": "sd",
    "uhc_scratch": "uhc",
    "uhc_ckd": "uhc",
}

_RUNNER = (
    "BaselineConfig",
    "BaselineResult",
    "BaselineRunner",
    "Sources",
    "baseline_runner",
    "budget_epochs",
    "load_oracle",
    "oracle_files",
    "poe_row",
    "result_row",
    "target_network",
)


def method(name: str) -> Any:
    """The method ``name`` (a ``PoE.build.baselines.base.Method``); an unknown name is a one-line error."""
    if name not in METHODS:
        from PoE.core.errors import PoEError

        raise PoEError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    return importlib.import_module(f"PoE.build.baselines.{METHODS[name]}").build(name)


def __getattr__(name: str) -> Any:
    if name in _RUNNER:
        return getattr(importlib.import_module("PoE.build.baselines.runner"), name)
    raise AttributeError(f"module 'PoE.build.baselines' has no attribute {name!r}")
