"""Images as tensors, whatever the dataset: the pieces every dataset's reader and every stage share.

An ``ImageSet`` holds uint8 images in memory; npz files (``x``: uint8 N x H x W x 3, ``y``: int64) store them,
and JPEG folders are decoded once into npz caches (``cache_root``). ``image_batch`` checks user images. The
training batches drawn from them are ``PoE.core.loaders``'.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from PoE.core.checkpoint import atomic_write
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PIL import Image


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
        top = max([int(self.y.max()) if len(self.y) else -1, *classes]) + 1  # classes the split lacks too
        lookup = torch.full((top,), -1, dtype=torch.long)
        lookup[torch.tensor(classes)] = torch.arange(len(classes))
        mapped = lookup[self.y]
        keep = (mapped >= 0).nonzero().flatten()
        return self.subset(keep), mapped[keep]


def save_npz_atomic(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write an (x, y) npz so that a crash never leaves a truncated file at ``path``."""
    atomic_write(path, lambda f: np.savez(f, x=x, y=y))


def check_npz_sizes(path: Path) -> None:
    """Raise unless every array's header agrees with the bytes the file holds for it: numpy allocates what a
    header claims before reading, so a 1.5 KB file claiming 10^9 images would end in a MemoryError."""
    if not zipfile.is_zipfile(path):
        return  # np.load says what it is
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                if version not in read:
                    raise PoEError(f"{path}: array {info.filename} has .npy format {version}; 1.0 and 2.0 are read")
                shape, _, dtype = read[version](f)
                header = f.tell()
            if dtype.hasobject:
                continue  # np.load refuses pickled arrays itself
            claimed = math.prod(shape) * dtype.itemsize
            inflated = info.compress_type != zipfile.ZIP_STORED and info.file_size > 1100 * info.compress_size + 4096
            if claimed + header != info.file_size or inflated:
                raise PoEError(
                    f"{path}: array {info.filename[:-4]} claims {shape} {dtype} ({claimed:,} bytes), but the file "
                    f"holds {max(info.file_size - header, 0):,} bytes for it ({info.compress_size:,} stored): "
                    "damaged or not an image file; rewrite it"
                )


def load_npz(path: Path, size: int | None = None, num_classes: int | None = None) -> ImageSet:
    """An (x, y) npz as an ImageSet; anything but N >= 1 uint8 RGB images of ``size`` with labels in
    0..num_classes-1 is a one-line error naming the file."""
    try:
        check_npz_sizes(path)
        with np.load(path) as z:
            x, y = z["x"], z["y"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as e:
        why = "the file is empty (0 bytes)" if path.is_file() and path.stat().st_size == 0 else type(e).__name__
        raise PoEError(f"{path} is not a readable npz with arrays x and y ({why})") from None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
        raise PoEError(
            f"{path}: expected x uint8 N x H x W x 3 and y of length N, got x {x.shape} {x.dtype}, y {y.shape}"
        )
    if len(x) == 0:
        raise PoEError(f"{path} holds no images")
    if size is not None and x.shape[1:3] != (size, size):
        raise PoEError(f"{path}: images are {x.shape[2]}x{x.shape[1]}, this dataset's are {size}x{size}")
    if not np.issubdtype(y.dtype, np.integer):
        raise PoEError(f"{path}: labels y must be integers, got {y.dtype}")
    if num_classes is not None and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise PoEError(f"{path}: labels must be 0..{num_classes - 1}, found {int(y.min())}..{int(y.max())}")
    return ImageSet(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y.astype(np.int64)))


def cache_root() -> Path:
    """Where decoded image folders are cached (``$POE_CACHE``, default ``~/.cache/PoE``): never in the data."""
    return Path(os.environ.get("POE_CACHE") or Path.home() / ".cache" / "PoE")


MAX_IMAGE_PIXELS = 50_000_000  # per image file, and once its shorter side is resized: 150 MB of RGB


class ImageTooLarge(ValueError):
    """An image over ``MAX_IMAGE_PIXELS``, found from its header before any pixel is decoded."""


@contextmanager
def opened_image(path: str | Path, side: int | None = None) -> Iterator[Image.Image]:
    """The image file ``path`` opened by PIL, its header read and no pixel decoded yet, once it is known to fit:
    a regular file (opened without blocking: a FIFO is refused, not waited on) of at most ``MAX_IMAGE_PIXELS``
    pixels, and as many once its shorter side is resized to ``side`` (a 2 KB PNG of 1 x 1,000,000 pixels
    resized to 32 would be 32 x 32,000,000). Raises OSError or ValueError (``ImageTooLarge``) otherwise, as
    PIL does for a broken file, so callers name the file in one line or skip it."""
    import warnings

    from PIL import Image

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(f)
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise ImageTooLarge(f"over PIL's limit of {Image.MAX_IMAGE_PIXELS:,} pixels") from None
        with im:
            w, h = im.size
            resized = side * side * max(w, h) / max(min(w, h), 1) if side else 0
            if w * h > MAX_IMAGE_PIXELS or resized > MAX_IMAGE_PIXELS:
                resize = f" once its shorter side is resized to {side}" if resized > MAX_IMAGE_PIXELS else ""
                raise ImageTooLarge(f"{w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} read per image{resize}")
            yield im


def decode_images(files: list[Path], size: int, progress: bool = True) -> np.ndarray:
    """JPEGs -> uint8 N x size x size x 3 (grayscale converted to RGB, as PIL's convert does)."""
    from tqdm import tqdm

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    # tqdm's disable=None: a bar on terminals only, so logs and captured output stay clean
    for i, f in enumerate(tqdm(files, desc="decoding images", disable=None if progress else True, leave=False)):
        try:
            with opened_image(f) as im:
                if im.size != (size, size):  # before decoding
                    raise PoEError(f"{f} is {im.size[0]}x{im.size[1]}, expected {size}x{size}")
                img = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise PoEError(f"cannot read image {f} ({e})") from None
        if img.shape != (size, size, 3):
            raise PoEError(f"{f} is {img.shape[1]}x{img.shape[0]}, expected {size}x{size}")
        out[i] = img
    return out


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file (the manifest records the training images' file by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Normalizer:
    """Images -> float, standardised per channel: uint8 ones (0..255) scaled to [0, 1] first, float ones taken as
    [0, 1] already."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], device: torch.device | str = "cpu") -> None:
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


IMAGE_INPUTS = (
    "uint8 arrays H x W x 3 (or a stack N x H x W x 3), PIL images, uint8 tensors 3 x H x W (or N x 3 x H x W) "
    "of 0..255 pixels, or float tensors of the same shapes in [0, 1]"
)


def image_batch(images: object, size: int) -> torch.Tensor:
    """User images as float32 RGB in [0, 1], N x 3 x ``size`` x ``size``; anything else is a one-line error
    naming what is accepted (a wrong scale would not fail later: it would answer wrong)."""
    if isinstance(images, list | tuple):
        if not images:
            raise PoEError(f"no images given; accepted: {IMAGE_INPUTS}")
        parts = [image_batch(im, size) for im in images]
        return torch.cat(parts)
    if type(images).__module__.startswith("PIL."):
        images = np.asarray(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise PoEError(f"numpy images must be uint8 (0..255), got {images.dtype}; accepted: {IMAGE_INPUTS}")
        arr = images[None] if images.ndim == 3 else images
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise PoEError(f"numpy images must be H x W x 3 or N x H x W x 3, got {images.shape}")
        images = torch.from_numpy(np.array(arr)).permute(0, 3, 1, 2)  # a copy: PIL's arrays are read-only
    if not isinstance(images, torch.Tensor):
        raise PoEError(f"cannot read images of type {type(images).__name__}; accepted: {IMAGE_INPUTS}")
    x = images[None] if images.ndim == 3 else images
    if x.ndim != 4 or x.shape[1] != 3:
        raise PoEError(f"image tensors must be 3 x H x W or N x 3 x H x W (RGB), got {tuple(images.shape)}")
    if len(x) == 0:
        raise PoEError(f"no images given (an empty batch, shape {tuple(images.shape)}); accepted: {IMAGE_INPUTS}")
    if tuple(x.shape[2:]) != (size, size):
        raise PoEError(f"images are {x.shape[3]}x{x.shape[2]}, this pool takes {size}x{size} RGB images")
    if x.dtype == torch.uint8:
        return x.float().div_(255)
    if not x.is_floating_point():
        raise PoEError(f"image tensors must be uint8 or float, got {x.dtype}; accepted: {IMAGE_INPUTS}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):  # NaN compares as in range, and a NaN image was predicted as a class
        raise PoEError("float images hold NaN or inf values; accepted: finite values in [0, 1]")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise PoEError(
            f"float images must be in [0, 1], got values from {float(x.min()):.3g} to {float(x.max()):.3g}; "
            "divide 0..255 pixels by 255 (or pass them as uint8)"
        )
    return x
