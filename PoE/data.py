"""Datasets held as uint8 tensors, with augmentation and normalisation done on whole batches.

Image datasets that fit in memory (CIFAR-100, Tiny-ImageNet) are decoded once into
``<data_root>/<name>/{train,test}.npz`` (``x``: uint8 N x H x W x 3, ``y``: int64) and served as
tensors. A training "view" is one random crop+flip of every image, drawn from a seed, so a view can
be recomputed exactly: that lets teacher outputs be cached per view and shared by later stages.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from PoE.errors import PoEError


@dataclass
class ImageSet:
    """Images (uint8, N x 3 x H x W) and labels (int64, N)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> ImageSet:
        return ImageSet(self.x[index], self.y[index])

    def with_classes(self, classes: list[int]) -> tuple[ImageSet, torch.Tensor]:
        """Images whose label is in ``classes``, and their labels remapped to positions in ``classes``."""
        lookup = torch.full((int(self.y.max()) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        mapped = lookup[self.y]
        keep = (mapped >= 0).nonzero().flatten()
        return self.subset(keep), mapped[keep]


def save_npz_atomic(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write an (x, y) npz so that a crash never leaves a truncated file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: Path) -> ImageSet:
    try:
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except (OSError, KeyError, ValueError) as e:
        raise PoEError(f"{path} is not a readable image file with arrays x and y ({e})") from None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or len(x) != len(y):
        raise PoEError(f"{path}: expected x uint8 N x H x W x 3 and y of length N, got x {x.shape} {x.dtype}")
    return ImageSet(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64)))


def fetch_cifar100(folder: Path, split: str) -> None:
    """Download CIFAR-100 through torchvision and cache it as ``<folder>/<split>.npz``."""
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR100(str(folder / "torchvision"), train=split == "train", download=True)
    except Exception as e:  # any download failure gets the same advice
        raise PoEError(
            f"CIFAR-100 not found at {folder / (split + '.npz')} and the torchvision download failed ({e}); "
            "pass --data_root pointing at a folder with cifar100/{train,test}.npz"
        ) from None
    save_npz_atomic(folder / f"{split}.npz", np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets))


def load_split(dataset: str, data_root: str | Path, split: str) -> ImageSet:
    """The ``split`` ('train' or 'test') of an in-memory dataset, decoding and caching on first use."""
    folder = Path(data_root) / dataset
    path = folder / f"{split}.npz"
    if not path.exists():
        if dataset != "cifar100":
            raise PoEError(f"no {split} data for {dataset} at {path}")
        fetch_cifar100(folder, split)
    return load_npz(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Normalizer:
    """uint8 images -> float, scaled to [0, 1], then standardised per channel."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - self.mean) / self.std


def view_params(n: int, pad: int, seed: int, view: int) -> torch.Tensor:
    """Crop offsets (dy, dx in [0, 2*pad]) and flip bit for every image of one view (int64, n x 3)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + view)
    off = torch.randint(0, 2 * pad + 1, (n, 2), generator=g)
    flip = torch.randint(0, 2, (n, 1), generator=g)
    return torch.cat([off, flip], 1)


def crop_flip(x: torch.Tensor, params: torch.Tensor, pad: int) -> torch.Tensor:
    """Random-crop (zero padding of ``pad``) and horizontal flip of a batch, as torchvision does per image."""
    if pad == 0 and not bool(params[:, 2].any()):
        return x
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    params = params.to(x.device)
    rows = params[:, 0:1] + torch.arange(h, device=x.device)  # b x h
    cols = params[:, 1:2] + torch.arange(w, device=x.device)  # b x w
    cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    out = xp.permute(0, 2, 3, 1)[bi, rows.unsqueeze(2), cols.unsqueeze(1)]  # b x h x w x c
    return out.permute(0, 3, 1, 2)


@dataclass
class Batch:
    x: torch.Tensor  # normalised float images on the device
    y: torch.Tensor  # labels on the device
    index: torch.Tensor  # rows of the dataset (CPU), to look up cached teacher outputs
    view: int  # which augmented view the images come from (-1: no augmentation)


class TensorLoader:
    """Shuffled, augmented batches of an in-memory ImageSet, reproducible from (seed, epoch, view)."""

    def __init__(
        self,
        data: ImageSet,
        batch_size: int,
        normalize: Normalizer,
        pad: int,
        device: torch.device | str,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        view_seed: int | None = None,
    ) -> None:
        """``seed`` fixes the batch order of each epoch, ``view_seed`` (default ``seed``) the augmented views."""
        self.device, self.seed = torch.device(device), seed
        self.view_seed = seed if view_seed is None else view_seed
        if self.device.type == "cuda":  # a whole in-memory dataset fits on the GPU: no per-batch copies
            data = ImageSet(data.x.to(self.device), data.y.to(self.device))
        self.data, self.batch_size, self.normalize, self.pad = data, batch_size, normalize, pad
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(1, len(self.data) // self.world // self.batch_size)  # the last partial batch is dropped

    def epoch(self, epoch: int, view: int | None = None) -> Iterator[Batch]:
        """Batches of one epoch; images come from augmented ``view`` (default: the epoch number)."""
        view = epoch if view is None else view
        n = len(self.data)
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        perm = torch.randperm(n, generator=g)
        perm = perm[: (n // self.world) * self.world][self.rank :: self.world]  # this rank's shard
        params = view_params(n, self.pad, self.view_seed, view)
        for i in range(len(self)):
            idx = perm[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.make_batch(idx, params[idx], view)

    def ordered(self, view: int | None, batch_size: int | None = None) -> Iterator[Batch]:
        """All images in dataset order, from ``view`` (None: un-augmented)."""
        n = len(self.data)
        params = view_params(n, self.pad, self.view_seed, view) if view is not None else None
        bs = batch_size or self.batch_size
        for s in range(0, n, bs):
            idx = torch.arange(s, min(s + bs, n))
            yield self.make_batch(idx, None if params is None else params[idx], -1 if view is None else view)

    def make_batch(self, idx: torch.Tensor, params: torch.Tensor | None, view: int) -> Batch:
        rows = idx.to(self.data.x.device)
        x = self.data.x[rows].to(self.device, non_blocking=True)
        if params is not None:
            x = crop_flip(x, params, self.pad)
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
        return Batch(x, self.data.y[rows].to(self.device, non_blocking=True), idx, view)
