"""The datasets a pool can be built for: one module each, registered in ``DATASETS``.

A dataset module holds everything that is its own (class names, primitive tasks, normalisation and sizes, the
networks it uses, the reader of its files) as ``SETTINGS``, the keyword arguments of its ``DatasetConfig``;
every stage runs the same code on it. Adding a dataset is one new module and one entry in ``DATASETS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PoE.core.datasets import cifar100, folder, imagenet, tinyimagenet
from PoE.core.errors import PoEError

if TYPE_CHECKING:  # the registry is read by every --help, which must not wait for torch (PoE.core.data imports it)
    from PoE.core.data import ImageSet

# (data_root, split, progress, classes) -> (images, the file or folder they were read from); ``classes`` only
# matters to a streamed dataset, whose test split is read per query
Reader = Callable[[Path, str, bool, list[int] | None], tuple["ImageSet", Path]]
# (data_root, classes) -> (image files, class ids) of the training images that are streamed from disk
Lister = Callable[[Path, list[int]], tuple[list[Path], list[int]]]


@dataclass(frozen=True)
class DatasetConfig:
    name: str  # command-line name and folder of the pool
    tag: str  # suffix of the original code's file names (library_<tag>.pt)
    num_classes: int
    image_size: int
    crop_pad: int  # zero padding of the random crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tasks: dict[str, list[int]]
    default_tasks: list[str]
    oracle_arch: str  # the paper's Oracle
    library_arch: str  # the WRN whose front is the library, or the pretrained network it is cut from
    expert_width: int  # width of an expert's block3 (WRN) or last conv (MobileNetV2)
    read: Reader  # one split held in memory
    first_stride: int = 1
    train_files: Lister | None = None  # set for datasets too big for memory: their training images are streamed
    pretrained: bool = False  # Oracle and library come with ImageNet weights: only the experts are trained
    expert_stage: dict = field(default_factory=dict)  # the paper's expert schedule where it differs (paper profile)
    class_names: tuple[str, ...] = ()  # by class id
    read_class_names: Callable[[], Sequence[str]] | None = None  # class names that are slow to get: read on first use
    aliases: tuple[str, ...] = ()  # another name of each class, by class id (Tiny-ImageNet's WordNet ids)
    # a dataset described by its files (``folder``): (cfg, data_root, image_size, skip_bad) -> cfg, and
    # (cfg, pool folder, skip_bad) -> cfg as the pool's dataset.json records it (None: it records none)
    from_data: Callable[[DatasetConfig, Path, int | None, bool], DatasetConfig] | None = None
    from_pool: Callable[[DatasetConfig, Path, bool], DatasetConfig | None] | None = None
    description: dict | None = None  # what the pool records of such a dataset (class names, image size)

    @property
    def family(self) -> str:
        """The network family of the library and experts (``PoE.core.networks.FAMILIES``): MobileNetV2 where the
        library is one (``mobilenet_v2``, ``mobilenet_v2-0.5``), else the WRN family."""
        return "mobilenetv2" if self.library_arch.startswith("mobilenet_v2") else "wrn"

    @property
    def streamed(self) -> bool:
        """Whether the training images are streamed from disk (and a test split is read per query's classes)."""
        return self.train_files is not None

    def class_name(self, class_id: int) -> str:
        if not self.class_names and self.read_class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.read_class_names()))
        return self.class_names[class_id] if class_id < len(self.class_names) else f"class {class_id}"

    def class_aliases(self, class_id: int) -> tuple[str, ...]:
        """Other names a hierarchy file may give the class by."""
        return (self.aliases[class_id],) if class_id < len(self.aliases) else ()


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
    return cfg.read(Path(data_root), split, progress, classes)[0]


def described_by_pool(cfg: DatasetConfig, root: Path, skip_bad: bool = False) -> DatasetConfig:
    """``cfg`` as the pool folder ``root`` describes it (a folder dataset's classes and image size); the
    registry's own config for the built-in datasets."""
    if cfg.from_pool is None:
        return cfg
    got = cfg.from_pool(cfg, root, skip_bad)
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
    if cfg.from_data is None or cfg.from_pool is None:
        if image_size not in (None, cfg.image_size):
            raise PoEError(
                f"--image_size {image_size}: {cfg.name}'s images are {cfg.image_size} pixels (the flag "
                "sets the size of --dataset folder)"
            )
        return cfg
    new = cfg.from_data(cfg, data_root, image_size, skip_bad)
    for root in folders:
        old = cfg.from_pool(cfg, root, skip_bad)
        if old is None or old.description == new.description:
            continue
        if all(p.name == folder.DESCRIPTION_FILE for p in root.iterdir()):  # only a refused run's: nothing built
            continue
        raise PoEError(
            f"{root / folder.DESCRIPTION_FILE} was built from {old.num_classes} classes at "
            f"{old.image_size} pixels; {data_root} gives {new.num_classes} classes at {new.image_size} "
            "pixels: another dataset needs another --db and --pretrained"
        )
    return new
