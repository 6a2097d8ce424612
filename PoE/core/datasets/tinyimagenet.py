"""Tiny-ImageNet: 64 x 64 images of 200 classes, grouped into 34 primitive tasks.

Read from the folder as distributed (``<data_root>/tiny-imagenet-200/``; its val/ is the test split), decoded
once into an npz cache keyed by the folder and its listing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from PoE.core.datasets.config import DataSource, Networks
from PoE.core.errors import PoEError

if TYPE_CHECKING:  # PoE.core.data (torch) is imported where images are read: the registry (--help) needs neither
    from PoE.core.data import ImageSet

FOLDER = "tiny-imagenet-200"  # under data_root
SIZE = 64
LAYOUT = (
    "tiny-imagenet-200/ as distributed: wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG and "
    "val/val_annotations.txt (tab-separated: file, wnid, box)"
)

# the 200 WordNet ids; class id = position in sorted order (as ImageFolder numbers them)
CLASSES = (
    "n01443537",
    "n01629819",
    "n01641577",
    "n01644900",
    "n01698640",
    "n01742172",
    "n01768244",
    "n01770393",
    "n01774384",
    "n01774750",
    "n01784675",
    "n01855672",
    "n01882714",
    "n01910747",
    "n01917289",
    "n01944390",
    "n01945685",
    "n01950731",
    "n01983481",
    "n01984695",
    "n02002724",
    "n02056570",
    "n02058221",
    "n02074367",
    "n02085620",
    "n02094433",
    "n02099601",
    "n02099712",
    "n02106662",
    "n02113799",
    "n02123045",
    "n02123394",
    "n02124075",
    "n02125311",
    "n02129165",
    "n02132136",
    "n02165456",
    "n02190166",
    "n02206856",
    "n02226429",
    "n02231487",
    "n02233338",
    "n02236044",
    "n02268443",
    "n02279972",
    "n02281406",
    "n02321529",
    "n02364673",
    "n02395406",
    "n02403003",
    "n02410509",
    "n02415577",
    "n02423022",
    "n02437312",
    "n02480495",
    "n02481823",
    "n02486410",
    "n02504458",
    "n02509815",
    "n02666196",
    "n02669723",
    "n02699494",
    "n02730930",
    "n02769748",
    "n02788148",
    "n02791270",
    "n02793495",
    "n02795169",
    "n02802426",
    "n02808440",
    "n02814533",
    "n02814860",
    "n02815834",
    "n02823428",
    "n02837789",
    "n02841315",
    "n02843684",
    "n02883205",
    "n02892201",
    "n02906734",
    "n02909870",
    "n02917067",
    "n02927161",
    "n02948072",
    "n02950826",
    "n02963159",
    "n02977058",
    "n02988304",
    "n02999410",
    "n03014705",
    "n03026506",
    "n03042490",
    "n03085013",
    "n03089624",
    "n03100240",
    "n03126707",
    "n03160309",
    "n03179701",
    "n03201208",
    "n03250847",
    "n03255030",
    "n03355925",
    "n03388043",
    "n03393912",
    "n03400231",
    "n03404251",
    "n03424325",
    "n03444034",
    "n03447447",
    "n03544143",
    "n03584254",
    "n03599486",
    "n03617480",
    "n03637318",
    "n03649909",
    "n03662601",
    "n03670208",
    "n03706229",
    "n03733131",
    "n03763968",
    "n03770439",
    "n03796401",
    "n03804744",
    "n03814639",
    "n03837869",
    "n03838899",
    "n03854065",
    "n03891332",
    "n03902125",
    "n03930313",
    "n03937543",
    "n03970156",
    "n03976657",
    "n03977966",
    "n03980874",
    "n03983396",
    "n03992509",
    "n04008634",
    "n04023962",
    "n04067472",
    "n04070727",
    "n04074963",
    "n04099969",
    "n04118538",
    "n04133789",
    "n04146614",
    "n04149813",
    "n04179913",
    "n04251144",
    "n04254777",
    "n04259630",
    "n04265275",
    "n04275548",
    "n04285008",
    "n04311004",
    "n04328186",
    "n04356056",
    "n04366367",
    "n04371430",
    "n04376876",
    "n04398044",
    "n04399382",
    "n04417672",
    "n04456115",
    "n04465501",
    "n04486054",
    "n04487081",
    "n04501370",
    "n04507155",
    "n04532106",
    "n04532670",
    "n04540053",
    "n04560804",
    "n04562935",
    "n04596742",
    "n04597913",
    "n06596364",
    "n07579787",
    "n07583066",
    "n07614500",
    "n07615774",
    "n07695742",
    "n07711569",
    "n07715103",
    "n07720875",
    "n07734744",
    "n07747607",
    "n07749582",
    "n07753592",
    "n07768694",
    "n07871810",
    "n07873807",
    "n07875152",
    "n07920052",
    "n09193705",
    "n09246464",
    "n09256479",
    "n09332890",
    "n09428293",
    "n12267677",
)

# groups over class ids in sorted-wnid order; an expert's outputs follow the list order
TASKS: dict[str, list[int]] = {
    "arachnid": [7, 8, 9, 10],
    "canine": [24, 25, 26, 27, 28, 29],
    "feline": [30, 31, 32, 33, 34],
    "bird": [11, 20, 21, 22],
    "ungulate": [48, 49, 50, 51, 52, 53],
    "vertebrate_etc": [0, 1, 2, 3, 4, 5],
    "mammal": [12, 23, 35, 47, 54, 55, 56, 57, 58],
    "invertebrate_etc": [6, 13, 14, 15, 16, 17, 46, 18, 19],
    "insect": list(range(36, 46)),
    "garment": [60, 74, 77, 85, 105, 112, 120, 134, 158],
    "clothing_etc": [62, 90, 119, 149, 150, 169],
    "covering": [76, 106, 113, 144, 162, 168],
    "instrument_1": [75, 84, 109, 117, 125, 126],
    "instrument_2": [127, 137, 155, 156, 159],
    "device_etc_1": [59, 83, 86, 92, 118, 122, 123],
    "device_etc_2": [136, 139, 141, 148, 151, 152, 163],
    "vessel_etc": [67, 69, 72, 73, 80, 108, 115, 173],
    "bottle": [130, 135, 160, 172],
    "vehicle_1": [70, 94, 103, 107, 111],
    "vehicle_2": [116, 121, 133, 145, 153, 164, 166],
    "implement": [79, 99, 101, 104, 114, 131, 132, 174],
    "ball": [68, 87, 100, 110, 128, 138, 143, 171],
    "bridge": [154, 157, 170],
    "vegetable": [182, 183, 184, 185],
    "fruit": [186, 187, 188, 189, 199],
    "nutriment": [177, 179, 180, 190, 191, 192],
    "furniture": [97, 98, 142],
    "instrumentality_etc": [63, 81, 88, 89, 95, 175],
    "geological_formation": [194, 195, 196, 197, 198],
    "artifact_etc": [140, 146, 147, 161, 176],
    "shop": [65, 82, 93],
    "barrier": [64, 96, 129, 167],
    "structure_etc": [61, 66, 71, 78, 91, 102, 124, 165],
    "etc": [178, 181, 193],
}
DEFAULT_TASKS = ["arachnid", "canine", "feline", "bird", "ungulate", "vertebrate_etc"]


def class_names() -> tuple[str, ...]:
    """Readable names by class id: the first lemma of each WordNet synset, from the ImageNet metadata timm ships
    (read offline from the package; ``../shared`` has no words.txt). The wnids when timm is not installed."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return CLASSES
    info = ImageNetInfo()
    return tuple(info.label_name_to_description(w).split(",")[0].strip() for w in CLASSES)


def listing(folder: Path, split: str) -> tuple[list[Path], list[int]]:
    """Image files and class indices (position of the wnid in sorted order) of one Tiny-ImageNet split."""
    if not folder.is_dir():
        raise PoEError(f"no Tiny-ImageNet folder at {folder}; expected {LAYOUT}")
    wnids_file = folder / "wnids.txt"
    if wnids_file.is_file():
        wnids = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    elif (folder / "train").is_dir():
        wnids = sorted(d.name for d in (folder / "train").iterdir() if d.is_dir())
    else:
        raise PoEError(f"{folder} has neither wnids.txt nor train/; expected {LAYOUT}")
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        root = folder / "train"
        if not root.is_dir():
            raise PoEError(
                f"no Tiny-ImageNet training images: {root} is missing (a folder without train/ serves evaluation "
                f"only); expected {LAYOUT}"
            )
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            if d.name not in index:
                raise PoEError(f"{d} is not one of the wnids of {wnids_file}; expected {LAYOUT}")
            found = sorted((d / "images").glob("*.JPEG"))
            if not found:
                raise PoEError(f"no images in {d / 'images'}; expected {LAYOUT}")
            files += found
            labels += [index[d.name]] * len(found)
    else:
        ann = folder / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise PoEError(f"no Tiny-ImageNet validation annotations at {ann}; expected {LAYOUT}")
        for i, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1] not in index:
                raise PoEError(f"{ann} line {i} is not 'file<TAB>wnid<TAB>box' with a known wnid: {line[:80]!r}")
            files.append(folder / "val" / "images" / fields[0])
            labels.append(index[fields[1]])
    if not files:
        raise PoEError(f"no images listed for the {split} split of {folder}; expected {LAYOUT}")
    return files, labels


def read(data_root: Path, split: str, progress: bool, classes: list[int] | None) -> tuple[ImageSet, Path]:
    """The ``split`` ('train' or 'test': val/) and the cached npz it was read from; the folder is decoded on
    first use."""
    from PoE.core.data import cache_root, decode_images, load_npz, save_npz_atomic

    folder, split = data_root / FOLDER, "train" if split == "train" else "test"
    files, labels = listing(folder, split)
    key = hashlib.sha256(str(folder.resolve()).encode())
    for f, y in zip(files, labels, strict=True):
        key.update(f"{f.name}:{y};".encode())
    cache = cache_root() / "tinyimagenet" / f"{split}-{key.hexdigest()[:16]}.npz"
    if not cache.exists():
        save_npz_atomic(cache, decode_images(files, SIZE, progress), np.asarray(labels, dtype=np.int64))
    return load_npz(cache, SIZE), cache


SETTINGS = {
    "name": "tinyimagenet",
    "tag": "TinyImageNet",
    "num_classes": 200,
    "image_size": SIZE,
    "crop_pad": 8,
    "mean": (0.485, 0.456, 0.406),  # ImageNet statistics, as the original code
    "std": (0.229, 0.224, 0.225),
    "tasks": TASKS,
    "default_tasks": DEFAULT_TASKS,
    "aliases": CLASSES,  # a hierarchy file may name a class by its wnid too
    "networks": Networks(oracle_arch="wrn-16-10", library_arch="wrn-16-2", expert_width=16, first_stride=2),
    # readable names, read on first use (importing timm takes a moment)
    "source": DataSource(read=read, read_class_names=class_names),
}
