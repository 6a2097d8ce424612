"""What a dataset is to every stage: ``DatasetConfig``, with the networks it is built with (``Networks``) and the
way its files are read (``DataSource``) as records of their own. Imports no dataset module (they import it)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the registry is read by every --help, which must not wait for torch (PoE.core.data imports it)
    from PoE.core.data import ImageSet

# (data_root, split, progress, classes) -> (images, the file or folder they were read from); ``classes`` only
# matters to a streamed dataset, whose test split is read per query
Reader = Callable[[Path, str, bool, list[int] | None], tuple["ImageSet", Path]]
# (data_root, classes) -> (image files, class ids) of the training images that are streamed from disk
Lister = Callable[[Path, list[int]], tuple[list[Path], list[int]]]


@dataclass(frozen=True)
class Networks:
    """The networks of a dataset's pool: the Oracle it is distilled from, the library, the experts' width."""

    oracle_arch: str  # the paper's Oracle
    library_arch: str  # the WRN whose front is the library, or the pretrained network it is cut from
    expert_width: int  # width of an expert's block3 (WRN) or last conv (MobileNetV2)
    first_stride: int = 1
    pretrained: bool = False  # Oracle and library come with ImageNet weights: only the experts are trained
    expert_stage: dict = field(default_factory=dict)  # the paper's expert schedule where it differs (paper profile)


@dataclass(frozen=True)
class DataSource:
    """How a dataset's images are read, and, for a dataset described by its files (``folder``), how it is
    described by them and by the pool built from them."""

    read: Reader  # one split held in memory
    train_files: Lister | None = None  # set for datasets too big for memory: their training images are streamed
    read_class_names: Callable[[], Sequence[str]] | None = None  # class names that are slow to get: read on first use
    # (cfg, data_root, image_size, skip_bad) -> cfg, and (cfg, pool folder, skip_bad) -> cfg as the pool's
    # dataset.json records it (None: it records none)
    from_data: Callable[[DatasetConfig, Path, int | None, bool], DatasetConfig] | None = None
    from_pool: Callable[[DatasetConfig, Path, bool], DatasetConfig | None] | None = None
    description: dict | None = None  # what the pool records of such a dataset (class names, image size)


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
    networks: Networks
    source: DataSource
    class_names: tuple[str, ...] = ()  # by class id
    aliases: tuple[str, ...] = ()  # another name of each class, by class id (Tiny-ImageNet's WordNet ids)

    @property
    def family(self) -> str:
        """The network family of the library and experts (``PoE.core.networks.FAMILIES``): MobileNetV2 where the
        library is one (``mobilenet_v2``, ``mobilenet_v2-0.5``), else the WRN family."""
        return "mobilenetv2" if self.networks.library_arch.startswith("mobilenet_v2") else "wrn"

    @property
    def streamed(self) -> bool:
        """Whether the training images are streamed from disk (and a test split is read per query's classes)."""
        return self.source.train_files is not None

    def class_name(self, class_id: int) -> str:
        if not self.class_names and self.source.read_class_names is not None:
            object.__setattr__(self, "class_names", tuple(self.source.read_class_names()))
        return self.class_names[class_id] if class_id < len(self.class_names) else f"class {class_id}"

    def class_aliases(self, class_id: int) -> tuple[str, ...]:
        """Other names a hierarchy file may give the class by."""
        return (self.aliases[class_id],) if class_id < len(self.aliases) else ()
