"""ImageNet-1k (the paper's ImageNet experiment): four bird groups as the primitive tasks, a pretrained
torchvision Oracle and MobileNetV2 library, images streamed from an ImageFolder-style folder.

The training images are too many for memory: they are listed here and decoded per batch by ``FolderLoader``;
a test split holds only the queried classes' validation images (50 each), decoded into memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from PoE.core.datasets.config import DataSource, Networks
from PoE.core.errors import PoEError

if TYPE_CHECKING:  # torch and PoE.core.data are imported where images are read: the registry (--help) needs neither
    from PoE.core.data import ImageSet

FOLDER = "imagenet"  # under data_root
SIZE = 224  # random resized crop 224 + flip (train); resize 256 + centre crop 224 (test)
NUM_CLASSES = 1000
LAYOUT = (
    "{folder}/ with train/<class>/*.JPEG and val/<class>/*.JPEG: one folder per class, the same {n} names in "
    "both (e.g. the wnids; class id = position in sorted order), val/ sorted into class folders"
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# bird groups (class ids 0..999)
TASKS: dict[str, list[int]] = {
    "bird_passerine": list(range(10, 21)),
    "bird_aquatic1": [*range(97, 101), *range(127, 135)],
    "bird_aquatic2": list(range(135, 147)),
    "bird_etc1": list(range(87, 97)),
}
DEFAULT_TASKS = list(TASKS)


def class_names() -> tuple[str, ...]:
    """torchvision's category names, by class id (read on first use: importing torchvision's weights is slow)."""
    from torchvision.models import MobileNet_V2_Weights

    return tuple(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def listing(folder: Path, split: str, classes: list[int] | None = None) -> tuple[list[Path], list[int]]:
    """Image files and class ids of one split of the folder, for ``classes`` only (all when None): only those
    classes' folders are listed, so a query over a few classes starts at once."""
    layout = LAYOUT.format(folder=folder.name, n=NUM_CLASSES)
    if not folder.is_dir():
        raise PoEError(f"no image folder at {folder}; expected {layout}")
    root = folder / ("train" if split == "train" else "val")
    if not root.is_dir():
        what = "training" if split == "train" else "validation (test)"
        raise PoEError(f"no {what} images: {root} is missing; expected {layout}")
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(names) != NUM_CLASSES:
        loose = next((f.name for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES), None)
        hint = f" (it holds images such as {loose} directly: sort them into class folders)" if loose else ""
        raise PoEError(f"{root} has {len(names)} class folders, expected {NUM_CLASSES}{hint}; expected {layout}")
    files: list[Path] = []
    labels: list[int] = []
    for c in range(NUM_CLASSES) if classes is None else sorted(classes):
        found = sorted(f for f in (root / names[c]).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise PoEError(f"no images in {root / names[c]} (class {c}); expected {layout}")
        files += found
        labels += [c] * len(found)
    return files, labels


def train_files(data_root: Path, classes: list[int]) -> tuple[list[Path], list[int]]:
    """The training images of ``classes`` (all a run's experts train on), to be streamed."""
    return listing(data_root / FOLDER, "train", classes)


def read(data_root: Path, split: str, progress: bool, classes: list[int] | None) -> tuple[ImageSet, Path]:
    """The test view (resize + centre crop) of ``classes``' validation images, decoded by workers into memory,
    and the folder they came from; the training split is only streamed."""
    import torch

    from PoE.core.data import ImageSet
    from PoE.core.loaders import FolderLoader, default_workers

    folder = data_root / FOLDER
    if split == "train":
        raise PoEError(f"imagenet's training images are streamed from {folder / 'train'}, not held in memory")
    if classes is None:
        raise PoEError("imagenet's test images are read per query: name the classes (tasks) to evaluate")
    files, labels = listing(folder, split, classes)
    loader = FolderLoader(files, labels, 64, lambda x: x, SIZE, "cpu", workers=default_workers())
    xs = [b.x.contiguous() for b in loader.ordered()]
    return ImageSet(torch.cat(xs), loader.labels), folder / "val"


SETTINGS = {
    "name": "imagenet",
    "tag": "ImageNet",
    "num_classes": NUM_CLASSES,
    "image_size": SIZE,
    "crop_pad": 0,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "tasks": TASKS,
    "default_tasks": DEFAULT_TASKS,
    "networks": Networks(
        oracle_arch="wide_resnet101_2",  # torchvision, ImageNet weights
        library_arch="mobilenet_v2",  # features[:18] of torchvision's, ImageNet weights
        expert_width=80,  # MobileNetV2's 1280-wide last conv narrowed 16x
        pretrained=True,
        expert_stage={"epochs": 20, "lr": 0.01, "milestones": (0.5, 0.75)},  # x0.1 at epochs 10 and 15
    ),
    "source": DataSource(read=read, train_files=train_files, read_class_names=class_names),
}
