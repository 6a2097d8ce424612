"""Your own images: an ImageFolder tree (``train/<class>/``, and ``test/<class>/`` or ``val/<class>/``).

Class names are the training folder's sub-folder names (class id = position in sorted order, as torchvision's
ImageFolder numbers them). Images are resized (shorter side) and centre-cropped to ``--image_size`` (default:
the first training image's longer side, at most 224) and, as the Tiny-ImageNet reader does, decoded once into an
npz cache keyed by the folder, its listing and the size; a split whose decoded images would take more than
``max_decoded_bytes`` is refused before decoding, in one line. Small images (<= 64) get the WRN family trained
here, as CIFAR-100 (<= 40 pixels) and Tiny-ImageNet (41-64) do; larger ones MobileNetV2, as ImageNet, but
distilled here from your ``--oracle`` (or an Oracle trained here) rather than cut from ImageNet weights. An
unreadable image is an error naming its path, unless ``--skip_bad_images`` says to skip it (each skipped file is
still named).

The pool records what it was built from (class names, image size) in ``dataset.json``, so that it can be opened
and served without the images.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import os
import stat
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from PoE.core.datasets.config import DataSource, Networks
from PoE.core.errors import PoEError
from PoE.core.jsonfile import file_kind, read_json

if TYPE_CHECKING:  # PoE.core.data (torch) is imported where images are read: the registry (--help) needs neither
    from PoE.core.data import ImageSet

NAME = "folder"
DESCRIPTION_FILE = "dataset.json"  # in the pool's folder
LAYOUT = "an image folder PATH with train/<class>/<images> and test/<class>/<images> (or val/<class>/)"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
SMALL = 64  # images up to this size get the WRN family; larger ones MobileNetV2
LARGE_DEFAULT = 224  # the default size of larger images is their own, at most this
LARGE_ORACLE, LARGE_LIBRARY = "mobilenet_v2", "mobilenet_v2-0.5"  # networks of larger images, trained here
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 8, 1024  # --image_size and dataset.json: the networks' input side, in pixels
DESCRIBED = 'expected a JSON object {"class_names": [2 or more names], "image_size": pixels}'
LIMIT_VAR = "POE_MAX_DECODED_GB"  # overrides the default limit on one split's decoded images


def split_folder(root: Path, split: str) -> Path:
    """``root/train``, or the first of ``root/test`` and ``root/val`` for the test split."""
    if not root.is_dir():
        raise PoEError(f"no image folder at {root}; expected {LAYOUT}")
    names = ("train",) if split == "train" else ("test", "val")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise PoEError(f"{root} has no {' or '.join(f'{n}/' for n in names)} folder; expected {LAYOUT}")


def entries(d: Path, images: bool) -> tuple[list[Path], list[str]]:
    """The sub-folders (``images``: the image files) of ``d``, sorted, and what stands where one could be but
    cannot be read as one: a dangling or looping symbolic link, a FIFO (opening it would wait for a writer), a
    device. Only these are named; anything else (a README beside the images, a hidden folder) is left out."""
    try:
        names = sorted(os.listdir(d))
    except OSError as e:
        raise PoEError(f"cannot list {d} ({e.strerror or e}); expected {LAYOUT}") from None
    kept: list[Path] = []
    odd: list[str] = []
    for name in names:
        path = d / name
        if (path.suffix.lower() not in IMAGE_SUFFIXES) if images else name.startswith("."):
            continue
        try:
            mode = path.stat().st_mode
        except OSError as e:
            if path.is_symlink():
                odd.append(
                    f"{path} ({'a symbolic link loop' if e.errno == errno.ELOOP else 'a dangling symbolic link'})"
                )
            continue
        if (stat.S_ISREG if images else stat.S_ISDIR)(mode):
            kept.append(path)
        elif images:
            odd.append(f"{path} ({file_kind(mode)})")
    return kept, odd


_reported: set[str] = set()


def report_skipped(odd: list[str]) -> None:
    """One line on stderr naming what a split's listing skipped (once per process: a split is listed more than
    once)."""
    line = f"skipped {len(odd)} entr{'y' if len(odd) == 1 else 'ies'} that cannot be read as an image or a folder: "
    line += ", ".join(odd[:5]) + (f" and {len(odd) - 5} more" if len(odd) > 5 else "")
    if odd and line not in _reported:
        _reported.add(line)
        print(line, file=sys.stderr)


def class_folders(root: Path) -> list[str]:
    """The class names: the sub-folders of ``train/`` (of ``test/``/``val/`` when there is no ``train/``)."""
    base = split_folder(root, "train" if (root / "train").is_dir() else "test")
    names = [d.name for d in entries(base, images=False)[0]]  # what it skips, the split's listing names
    if len(names) < 2:
        raise PoEError(f"{base} has {len(names)} class folder(s); a dataset needs at least 2; expected {LAYOUT}")
    return names


def listing(root: Path, split: str, names: list[str], classes: list[int] | None = None) -> tuple[list[Path], list[int]]:
    """Image files and class ids of one split, for ``classes`` only (all when None)."""
    base = split_folder(root, split)
    folders, odd = entries(base, images=False)
    extra = sorted({d.name for d in folders} - set(names))
    if extra:
        raise PoEError(f"{base / extra[0]} is not one of the {len(names)} classes of the training folder")
    files: list[Path] = []
    labels: list[int] = []
    for c in range(len(names)) if classes is None else sorted(classes):
        d = base / names[c]
        found, skipped = entries(d, images=True) if d.is_dir() else ([], [])
        odd += skipped
        if not found and split == "train":
            raise PoEError(f"no images in {d} (class {names[c]!r}); expected {LAYOUT}")
        files += found
        labels += [c] * len(found)
    if not files:
        raise PoEError(f"no {split} images of the asked classes under {base}; expected {LAYOUT}")
    if classes is None:  # the whole split: one line for all it skips
        report_skipped(odd)
    return files, labels


def default_size(root: Path, names: list[str]) -> int:
    """The first training image's size (its longer side), at most 224: small images keep theirs, large ones are
    not upscaled, photographs become ImageNet's 224."""
    from PoE.core.data import opened_image

    files, _ = listing(root, "train" if (root / "train").is_dir() else "test", names, [0])
    for f in files:
        try:
            with opened_image(f) as im:
                side = max(im.size)
        except (OSError, ValueError):
            continue
        return min(side, LARGE_DEFAULT)
    raise PoEError(f"no readable image among {files[0].parent}'s {len(files)} files; give --image_size")


def max_decoded_bytes() -> tuple[int, str]:
    """How many bytes one split's decoded images may take, and where that comes from: ``$POE_MAX_DECODED_GB``
    GB, else a quarter of this machine's memory (reading the cache back holds them twice for a moment)."""
    given = os.environ.get(LIMIT_VAR)
    if given:
        try:
            if float(given) <= 0:
                raise ValueError
            return int(float(given) * 1e9), f"${LIMIT_VAR}={given}"
        except ValueError:
            raise PoEError(f"${LIMIT_VAR}={given!r}: expected a positive number of gigabytes") from None
    why = f"a quarter of this machine's memory; ${LIMIT_VAR} sets it in GB"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4, why
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): a fixed 4 GB
        return 4 * 10**9, f"${LIMIT_VAR} sets it in GB"


def check_decoded_size(base: Path, n: int, size: int) -> None:
    """Refuse, before decoding anything, a split of ``n`` images whose decoded pixels exceed the limit."""
    each, (limit, why) = size * size * 3, max_decoded_bytes()
    if n * each > limit:
        hint = f" (at 96 pixels: {_amount(n * 96 * 96 * 3)})" if size > 96 else ""
        raise PoEError(
            f"{base}: {n:,} images of {size}x{size} pixels take {_amount(n * each)} decoded "
            f"({each / 1e3:.0f} KB each), over the limit of {_amount(limit)} ({why}); pass a smaller "
            f"--image_size{hint}, use fewer images, or raise ${LIMIT_VAR}"
        )


def _amount(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def decode(files: list[Path], size: int, skip_bad: bool, progress: bool) -> tuple[np.ndarray, list[int]]:
    """Images as uint8 N x size x size x 3 (shorter side resized to ``size``, centre crop) and the positions of
    the files that decoded; an unreadable file is an error, or with ``skip_bad`` a line on stderr."""
    from PIL import Image
    from tqdm import tqdm

    from PoE.core.data import opened_image

    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    kept: list[int] = []
    for i, f in enumerate(tqdm(files, desc="decoding images", disable=None if progress else True, leave=False)):
        try:
            with opened_image(f, size) as im:
                im = im.convert("RGB")
                if im.size != (size, size):
                    scale = size / min(im.size)
                    w, h = max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))
                    im = im.resize((w, h), Image.BILINEAR)
                    left, top = (w - size) // 2, (h - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                out[len(kept)] = np.asarray(im)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            if not skip_bad:
                raise PoEError(
                    f"cannot read image {f} ({type(e).__name__}: {str(e)[:120]}); remove it, or pass "
                    "--skip_bad_images to skip unreadable images"
                ) from None
            print(f"skipped unreadable image {f} ({type(e).__name__})", file=sys.stderr)
            continue
        kept.append(i)
    if not kept:
        raise PoEError(f"none of the {len(files)} images could be read (e.g. {files[0]})")
    return out[: len(kept)], kept


def read(
    data_root: Path,
    split: str,
    progress: bool,
    classes: list[int] | None,
    *,
    names: tuple[str, ...],
    size: int,
    skip_bad: bool = False,
) -> tuple[ImageSet, Path]:
    """The ``split`` of the folder (all its classes: the cache is per split) and the npz cache it came from."""
    from PoE.core.data import cache_root, load_npz, save_npz_atomic

    split = "train" if split == "train" else "test"
    files, labels = listing(data_root, split, list(names))
    check_decoded_size(split_folder(data_root, split), len(files), size)
    key = hashlib.sha256(f"{data_root.resolve()}|{size}|{skip_bad}|{'/'.join(names)}".encode())
    for f, y in zip(files, labels, strict=True):
        st = f.stat()
        key.update(f"{f.name}:{y}:{st.st_size}:{st.st_mtime_ns};".encode())
    cache = cache_root() / NAME / f"{split}-{key.hexdigest()[:16]}.npz"
    if not cache.exists():
        x, kept = decode(files, size, skip_bad, progress)
        save_npz_atomic(cache, x, np.asarray([labels[i] for i in kept], dtype=np.int64))
        del x  # not held twice while the cache is read back
    return load_npz(cache, size, len(names)), cache


def settings(names: list[str], size: int, skip_bad: bool = False) -> dict[str, Any]:
    """The DatasetConfig fields of a folder of ``names`` classes at ``size`` pixels: CIFAR-100's networks up to
    40 pixels, Tiny-ImageNet's up to 64 (a stride-2 first convolution), MobileNetV2 beyond: a width-1 Oracle
    when one is trained here (give yours with --oracle), a half-width library distilled from it (CPU-sized:
    0.48M parameters and 86M multiply-adds at 224 pixels, against the width-1 front's 1.81M and 279M), experts
    with ImageNet's 80-wide last conv."""
    description = {"dataset": NAME, "class_names": list(names), "image_size": size}
    base: dict[str, Any] = {
        "num_classes": len(names),
        "class_names": tuple(names),
        "image_size": size,
        "source": DataSource(
            read=partial(read, names=tuple(names), size=size, skip_bad=skip_bad),
            from_data=from_data,
            from_pool=from_pool,
            description=description,
        ),
    }
    if size <= 40:
        return base | {"crop_pad": 4, "networks": Networks("wrn-40-4", "wrn-16-1", expert_width=16)}
    if size <= SMALL:
        return base | {"crop_pad": 8, "networks": Networks("wrn-16-10", "wrn-16-2", expert_width=16, first_stride=2)}
    return base | {
        "crop_pad": size // 8,
        "networks": Networks(LARGE_ORACLE, LARGE_LIBRARY, expert_width=80, first_stride=2),
    }


def from_data(cfg: Any, data_root: Path, image_size: int | None, skip_bad: bool) -> Any:
    """``cfg`` (the registry's placeholder) described by the images under ``data_root``."""
    names = class_folders(Path(data_root))
    size = image_size or default_size(Path(data_root), names)
    return dataclasses.replace(cfg, **settings(names, size, skip_bad))


def from_pool(cfg: Any, root: Path, skip_bad: bool = False) -> Any:
    """``cfg`` as the pool folder ``root`` records it (``dataset.json``), or None when it records nothing."""
    path = root / DESCRIPTION_FILE
    if not os.path.lexists(path):
        return None
    names, size = described(read_json(path, "", DESCRIBED.removeprefix("expected ")), path)
    return dataclasses.replace(cfg, **settings(names, size, skip_bad))


def described(desc: Any, path: Path) -> tuple[list[str], int]:
    """The class names and image size ``dataset.json`` holds, checked: a pool is opened and served from them, so a
    size out of range or a broken name list is one line here rather than a traceback in a network."""
    names = desc.get("class_names") if isinstance(desc, dict) else None
    size = desc.get("image_size") if isinstance(desc, dict) else None
    bad_names = not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) != len(names)
    if bad_names or not all(isinstance(n, str) and n for n in names):
        raise PoEError(f"{path}: class_names must be a list of 2 or more different non-empty strings; {DESCRIBED}")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise PoEError(f"{path}: image_size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {size!r}")
    return names, size


SETTINGS = {
    "name": NAME,
    "tag": NAME,
    "num_classes": 0,  # until described by the images (Run_preprocessing) or by the pool (dataset.json)
    "image_size": 0,
    "crop_pad": 4,
    "mean": (0.485, 0.456, 0.406),  # ImageNet statistics: a fair default for photographs
    "std": (0.229, 0.224, 0.225),
    "tasks": {},
    "default_tasks": [],
    "networks": Networks(oracle_arch="wrn-40-4", library_arch="wrn-16-1", expert_width=16),
    "source": DataSource(read=partial(read, names=(), size=0), from_data=from_data, from_pool=from_pool),
}
