"""The datasets a pool can be built for: one module each, registered in ``DATASETS``.

A dataset module holds everything that is its own (class names, primitive tasks, normalisation and sizes, the
networks it uses, the reader of its files) as ``SETTINGS``, the keyword arguments of its ``DatasetConfig``
(``config.py``); every stage runs the same code on it. Adding a dataset is one new module and one entry in ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PoE.core.datasets import cifar100, folder, imagenet, tinyimagenet
from PoE.core.datasets.config import DatasetConfig, DataSource, Lister, Networks, Reader
from PoE.core.errors import PoEError

if TYPE_CHECKING:  # the registry is read by every --help, which must not wait for torch (PoE.core.data imports it)
    from PoE.core.data import ImageSet

__all__ = [
    "DATASETS",
    "DataSource",
    "DatasetConfig",
    "Lister",
    "Networks",
    "Reader",
    "class_index",
    "described_by_data",
    "described_by_pool",
    "get_dataset",
    "load_split",
]


def class_index(cfg: DatasetConfig) -> dict[str, list[int]]:
    """Every name a class is known by -> the class ids it names (torchvision's ImageNet names have repeats)."""
    index: dict[str, list[int]] = {}
    for c in range(cfg.num_classes):
        for name in {cfg.class_name(c), *cfg.class_aliases(c)}:
            index.setdefault(name, []).append(c)
    return index


DATASETS: dict[str, DatasetConfig] = {
    m.SETTINGS["name"]: DatasetConfig(**m.SETTINGS) for m in (cifar100, tinyimagenet, imagenet, folder)
}


def get_dataset(name: str) -> DatasetConfig:
    if name not in DATASETS:
        raise PoEError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_split(
    dataset: str | DatasetConfig,
    data_root: str | Path,
    split: str,
    progress: bool = True,
    classes: list[int] | None = None,
) -> ImageSet:
    """The ``split`` ('train' or 'test') of ``dataset`` (a name, or the config a pool was opened with: a folder
    dataset's is described by its pool), decoding and caching on first use; a streamed dataset's test split
    holds ``classes``' images only (in-memory datasets ignore ``classes``)."""
    cfg = dataset if isinstance(dataset, DatasetConfig) else get_dataset(dataset)
    return cfg.source.read(Path(data_root), split, progress, classes)[0]


def described_by_pool(cfg: DatasetConfig, root: Path, skip_bad: bool = False) -> DatasetConfig:
    """``cfg`` as the pool folder ``root`` describes it (a folder dataset's classes and image size); the
    registry's own config for the built-in datasets."""
    if cfg.source.from_pool is None:
        return cfg
    got = cfg.source.from_pool(cfg, root, skip_bad)
    if got is None:
        raise PoEError(
            f"{root} records no {folder.DESCRIPTION_FILE}: a {cfg.name} pool is built with "
            f"Run_preprocessing.py --dataset {cfg.name} --data_root PATH"
        )
    return got


def described_by_data(
    cfg: DatasetConfig, data_root: Path, image_size: int | None, skip_bad: bool, folders: Sequence[Path]
) -> DatasetConfig:
    """``cfg`` as a preprocessing run sees it: a folder dataset described by its images, and refused when one of
    ``folders`` (the pool, the Oracle's folder) was built from other classes or another image size."""
    source = cfg.source
    if source.from_data is None or source.from_pool is None:
        if image_size not in (None, cfg.image_size):
            raise PoEError(
                f"--image_size {image_size}: {cfg.name}'s images are {cfg.image_size} pixels (the flag "
                "sets the size of --dataset folder)"
            )
        return cfg
    new = source.from_data(cfg, data_root, image_size, skip_bad)
    for root in folders:
        old = source.from_pool(cfg, root, skip_bad)
        if old is None or old.source.description == new.source.description:
            continue
        if all(p.name == folder.DESCRIPTION_FILE for p in root.iterdir()):  # only a refused run's: nothing built
            continue
        raise PoEError(
            f"{root / folder.DESCRIPTION_FILE} was built from {old.num_classes} classes at "
            f"{old.image_size} pixels; {data_root} gives {new.num_classes} classes at {new.image_size} "
            "pixels: another dataset needs another --db and --pretrained"
        )
    return new
