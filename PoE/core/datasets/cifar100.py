"""CIFAR-100: 32 x 32 images of 100 classes; its 20 superclasses are the primitive tasks.

Read from ``<data_root>/cifar100/{train,test}.npz``, from the ``cifar-100-python/`` folder torchvision
downloads (with a reader that only accepts arrays), or downloaded through torchvision and cached as npz.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from PoE.core.datasets.config import DataSource, Networks
from PoE.core.errors import PoEError

if TYPE_CHECKING:  # torch and PoE.core.data are imported where images are read: the registry (--help) needs neither
    from PoE.core.data import ImageSet

FOLDER = "cifar100"  # under data_root
SIZE = 32
NUM_CLASSES = 100

# the fine labels: class id = position in this (alphabetical) list
CLASSES = (
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
)

# the superclasses; fine-label ids follow the alphabetical fine names (0=apple .. 99=worm)
TASKS: dict[str, list[int]] = {
    "aquatic_mammals": [4, 30, 55, 72, 95],
    "fish": [1, 32, 67, 73, 91],
    "flowers": [54, 62, 70, 82, 92],
    "food_containers": [9, 10, 16, 28, 61],
    "fruit_and_vegetables": [0, 51, 53, 57, 83],
    "household_electrical_devices": [22, 39, 40, 86, 87],
    "household_furniture": [5, 20, 25, 84, 94],
    "insects": [6, 7, 14, 18, 24],
    "large_carnivores": [3, 42, 43, 88, 97],
    "large_man-made_outdoor_things": [12, 17, 37, 68, 76],
    "large_natural_outdoor_scenes": [23, 33, 49, 60, 71],
    "large_omnivores_and_herbivores": [15, 19, 21, 31, 38],
    "medium-sized_mammals": [34, 63, 64, 66, 75],
    "non-insect_invertebrates": [26, 45, 77, 79, 99],
    "people": [2, 11, 35, 46, 98],
    "reptiles": [27, 29, 44, 78, 93],
    "small_mammals": [36, 50, 65, 74, 80],
    "trees": [47, 52, 56, 59, 96],
    "vehicles_1": [8, 13, 48, 58, 90],
    "vehicles_2": [41, 69, 81, 85, 89],
}
DEFAULT_TASKS = [
    "large_omnivores_and_herbivores",
    "medium-sized_mammals",
    "people",
    "small_mammals",
    "vehicles_1",
    "vehicles_2",
]


class ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes and numpy arrays, and nothing that could run code."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: only arrays are read from a data file")
        return super().find_class(module, name)


def torchvision_folder(root: Path, split: str) -> tuple[ImageSet, Path] | None:
    """CIFAR-100 as torchvision downloads it (``<root>/cifar-100-python/{train,test}``, or ``root`` being that
    folder), read in memory with a pickle reader that only accepts arrays; None when there is no such folder."""
    import torch

    from PoE.core.data import ImageSet

    base = root if root.name == "cifar-100-python" else root / "cifar-100-python"
    if not base.is_dir():
        return None
    path = base / split
    try:
        with open(path, "rb") as f:
            d = ArraysOnly(f, encoding="latin1").load()
        data, labels = np.asarray(d["data"], dtype=np.uint8), np.asarray(d["fine_labels"], dtype=np.int64)
        x = data.reshape(-1, 3, SIZE, SIZE)
    except (OSError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise PoEError(f"{path} is not a CIFAR-100 batch as torchvision downloads it ({e})") from None
    if len(x) != len(labels) or not len(x) or labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise PoEError(f"{path}: {len(x)} images and {len(labels)} labels in 0..99 expected to match")
    return ImageSet(torch.from_numpy(x.copy()), torch.from_numpy(labels)), path


def download(folder: Path, split: str) -> None:
    """Download CIFAR-100 through torchvision and cache it as ``<folder>/<split>.npz``; a failed download
    leaves no folder behind that was not there before."""
    import torchvision

    from PoE.core.data import save_npz_atomic

    made = [d for d in (folder.parent, folder) if not d.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".download-"))
    except OSError as e:
        raise PoEError(f"CIFAR-100 is not at {folder / (split + '.npz')} and {folder} is not writable ({e})") from None
    try:
        ds = torchvision.datasets.CIFAR100(str(tmp), train=split == "train", download=True)
        save_npz_atomic(folder / f"{split}.npz", np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets))
    except Exception as e:  # any download failure gets the same advice
        shutil.rmtree(tmp, ignore_errors=True)
        for d in reversed(made):
            shutil.rmtree(d, ignore_errors=True)
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise PoEError(
            f"CIFAR-100 not found at {folder / (split + '.npz')} and the torchvision download failed ({first}); "
            "pass --data_root pointing at a folder with cifar100/{train,test}.npz or torchvision's cifar-100-python/"
        ) from None
    shutil.rmtree(tmp, ignore_errors=True)


def read(data_root: Path, split: str, progress: bool, classes: list[int] | None) -> tuple[ImageSet, Path]:
    """The ``split`` ('train' or 'test') and the file it was read from: ``<data_root>/cifar100/<split>.npz``,
    else torchvision's folder under ``data_root``, else downloaded through torchvision into that npz."""
    from PoE.core.data import load_npz

    folder = data_root / FOLDER
    path = folder / f"{split}.npz"
    if not path.exists():
        held = torchvision_folder(data_root, split)
        if held is not None:
            return held
        download(folder, split)
    return load_npz(path, SIZE, NUM_CLASSES), path


SETTINGS = {
    "name": "cifar100",
    "tag": "cifar100",
    "num_classes": NUM_CLASSES,
    "image_size": SIZE,
    "crop_pad": 4,
    # the original code's constants (its released experts expect exactly these)
    "mean": (0.5071, 0.4867, 0.4408),
    "std": (0.2675, 0.2565, 0.2761),
    "tasks": TASKS,
    "default_tasks": DEFAULT_TASKS,
    "class_names": CLASSES,
    "networks": Networks(oracle_arch="wrn-40-4", library_arch="wrn-16-1", expert_width=16),
    "source": DataSource(read=read),
}
