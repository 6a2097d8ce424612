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

from PoE.datasets import cifar100, imagenet, tinyimagenet
from PoE.errors import PoEError

if TYPE_CHECKING:  # the registry is read by every --help, which must not wait for torch (PoE.data imports it)
    from PoE.data import ImageSet

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

    @property
    def streamed(self) -> bool:
        """Whether the training images are streamed from disk (and a test split is read per query's classes)."""
        return self.train_files is not None

    def class_name(self, class_id: int) -> str:
        if not self.class_names and self.read_class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.read_class_names()))
        return self.class_names[class_id] if class_id < len(self.class_names) else f"class {class_id}"


DATASETS: dict[str, DatasetConfig] = {
    m.SETTINGS["name"]: DatasetConfig(**m.SETTINGS) for m in (cifar100, tinyimagenet, imagenet)
}


def get_dataset(name: str) -> DatasetConfig:
    if name not in DATASETS:
        raise PoEError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def load_split(
    dataset: str, data_root: str | Path, split: str, progress: bool = True, classes: list[int] | None = None
) -> ImageSet:
    """The ``split`` ('train' or 'test') of ``dataset``, decoding and caching on first use; a streamed dataset's
    test split holds ``classes``' images only (in-memory datasets ignore ``classes``)."""
    return get_dataset(dataset).read(Path(data_root), split, progress, classes)[0]
