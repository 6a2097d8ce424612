"""torchvision ImageNet weights, read from a file or the local torch hub cache (never downloaded here)."""

from __future__ import annotations

from pathlib import Path

import torch

from PoE.core.checkpoint import load_checkpoint, unwrap
from PoE.core.errors import PoEError

WEIGHTS = "IMAGENET1K_V1"  # the weights of the paper's time; their test transform is resize 256 + crop 224


def hub_file(arch: str) -> tuple[Path, str]:
    """(where torchvision keeps ``arch``'s ImageNet weights in the hub cache, their download URL)."""
    import torchvision

    url = torchvision.models.get_model_weights(arch)[WEIGHTS].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1], url


def imagenet_weights(arch: str, path: str | Path | None, flag: str) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of ``arch`` from ``path`` or, without one, from the torch hub cache; a clear error
    says how to get it when absent (this project trains neither the ImageNet Oracle nor its library)."""
    if path is not None:
        sd, _ = unwrap(load_checkpoint(path, f"pass {flag} a {arch} state dict file"), path, "oracle")
        return sd, Path(path)
    try:
        file, url = hub_file(arch)
    except (ValueError, KeyError):
        raise PoEError(f"torchvision has no {WEIGHTS} weights for {arch}; pass {flag} FILE (a state dict)") from None
    if not file.is_file():
        raise PoEError(
            f"no ImageNet weights for {arch} at {file} (they are not trained here); fetch them on a machine with "
            f"internet with: python -c \"import torchvision; torchvision.models.get_model('{arch}', "
            f"weights='{WEIGHTS}')\" (or download {url}) and copy the file there, or pass {flag} FILE"
        )
    sd, _ = unwrap(load_checkpoint(file), file, "oracle")
    return sd, file
