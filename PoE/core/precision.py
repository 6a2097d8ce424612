"""Numeric precision of a run: bfloat16 autocast where the hardware makes it fast, fp32 elsewhere.

Under ``bf16`` only the activations (convolutions, matrix products) run in bfloat16: master weights,
optimizer state, BatchNorm statistics and every loss stay fp32 (autocast keeps softmax, log-softmax and
the reductions in fp32, and the losses cast logits up before they use them), and so do the logits themselves
(``fp32_linear``).

``fp32`` means IEEE fp32 on a GPU too: CUDA convolutions and matrix products would otherwise use TF32 (10-bit
mantissa) by default, which moved the README query's accuracy on a GPU (docs/precision.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from PoE.core.choices import PRECISIONS
from PoE.core.errors import PoEError


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name, recorded in manifests beside the times it produced."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_bf16_fast() -> bool:
    """Native bf16 instructions (AMX, AVX512-BF16) make bf16 convolutions several times faster than fp32; without
    them bf16 is emulated or refused (docs/precision.md has the measurements)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def cpu_bf16_supported() -> bool:
    """Whether bf16 runs at all: native instructions, or oneDNN's AVX512 emulation (slow, but correct)."""
    return (
        cpu_bf16_fast()
        or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        or ("avx512f" in cpu_flags() and torch.backends.mkldnn.is_available())
    )


def cuda_bf16_native() -> bool:
    """bf16 in hardware (Ampere and later), not emulated."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation to exclude
        return torch.cuda.is_bf16_supported()


def resolve(name: str, device: torch.device | str) -> str:
    """``auto`` -> ``bf16`` on a CUDA GPU with bf16 or an AMX CPU, else ``fp32``; ``bf16`` where the device
    cannot run it raises a one-line error naming what is supported."""
    device = torch.device(device)
    if name not in PRECISIONS:
        raise PoEError(f"unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        ok = torch.cuda.is_available() and cuda_bf16_native()
        fast = ok
        where = f"GPU {torch.cuda.get_device_name(device) if torch.cuda.is_available() else device}"
    else:
        ok, fast, where = cpu_bf16_supported(), cpu_bf16_fast(), f"CPU {cpu_model()}"
    if name == "bf16" and not ok:
        raise PoEError(f"--precision bf16: the {where} has no bfloat16 support; use --precision fp32 (or auto)")
    return ("bf16" if fast else "fp32") if name == "auto" else name


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision``: bfloat16 autocast for bf16; for fp32 nothing on a CPU and, on a
    GPU, TF32 turned off while it lasts (so that fp32 scores the same on a GPU as on a CPU)."""
    device = torch.device(device)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return ieee_fp32() if device.type == "cuda" else contextlib.nullcontext()


def ieee_scope(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """For fp32 on a GPU, TF32 off while the block runs (a whole training loop: its backward passes run outside
    ``autocast``); nothing elsewhere. Resolving a precision changes no switch: only this scope does."""
    return ieee_fp32() if torch.device(device).type == "cuda" and precision == "fp32" else contextlib.nullcontext()


def _new_api_switches() -> list[object]:
    """The objects holding torch >= 2.9's per-operation ``fp32_precision`` strings (none on an older torch)."""
    cudnn = torch.backends.cudnn
    objs = [getattr(cudnn, "conv", None), getattr(cudnn, "rnn", None), torch.backends.cuda.matmul]
    return [o for o in objs if o is not None and hasattr(o, "fp32_precision")]


def _legacy_cudnn_tf32() -> bool | None:
    """The legacy cuDNN switch; None where torch refuses to read it (conv and RNN switches set apart)."""
    try:
        return bool(torch._C._get_cudnn_allow_tf32())
    except RuntimeError:
        return None


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """TF32 off while the block runs, then every switch exactly as it was.

    The switches are turned off through the legacy flags (``allow_tf32``), which set cuDNN's conv and RNN
    precisions together: torch.export reads the legacy cuDNN flag (``cudnn.set_flags``), and that read fails when
    conv and RNN were set apart through the newer ``fp32_precision`` API (export on CUDA failed that way)."""
    saved = [(obj, obj.fp32_precision) for obj in _new_api_switches()]
    legacy_cudnn, legacy_matmul = _legacy_cudnn_tf32(), torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        if legacy_cudnn is not None:
            torch.backends.cudnn.allow_tf32 = legacy_cudnn
        torch.backends.cuda.matmul.allow_tf32 = legacy_matmul
        for obj, value in saved:
            if obj.fp32_precision != value:
                obj.fp32_precision = value


def fp32_linear(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` in fp32 even under bf16 autocast. Consolidation compares logits across experts, and bf16
    rounds a logit near 10 to steps of 1/16: enough to flip near-ties between experts (docs/precision.md)."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def describe(precision: str, requested: str, device: torch.device | str) -> str:
    """One line for the log: what was chosen and why."""
    if requested != "auto":
        return f"precision {precision} (asked for)"
    device = torch.device(device)
    if device.type == "cuda":
        why = "CUDA GPU with bf16" if precision == "bf16" else "this GPU has no bf16"
    else:
        why = "CPU with native bf16" if precision == "bf16" else "CPU without native bf16: fp32 is faster"
    return f"precision {precision} (auto: {why})"


def machine_info(device: torch.device | str) -> dict[str, str]:
    """What a run's times were measured on: CPU model, GPU name, torch version."""
    device = torch.device(device)
    info = {"cpu": cpu_model(), "cpu_bf16": "native" if cpu_bf16_fast() else "no", "torch": str(torch.__version__)}
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
