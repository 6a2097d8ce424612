"""Primitive tasks (groups of class ids) of each dataset, and composite queries over them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from PoE.errors import PoEError

# CIFAR-100's fine labels: class id = position in this (alphabetical) list.
CIFAR100_CLASSES = (
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
# Tiny-ImageNet's 200 WordNet ids; class id = position in sorted order (as ImageFolder numbers them).
TINYIMAGENET_CLASSES = (
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

# CIFAR-100 superclasses; fine-label ids follow the alphabetical fine names (0=apple .. 99=worm).
CIFAR100_TASKS: dict[str, list[int]] = {
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
CIFAR100_DEFAULT = [
    "large_omnivores_and_herbivores",
    "medium-sized_mammals",
    "people",
    "small_mammals",
    "vehicles_1",
    "vehicles_2",
]

# Tiny-ImageNet groups over class indices in sorted-wnid order; an expert's outputs follow the list order.
TINYIMAGENET_TASKS: dict[str, list[int]] = {
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
TINYIMAGENET_DEFAULT = ["arachnid", "canine", "feline", "bird", "ungulate", "vertebrate_etc"]

# ImageNet-1k bird groups (class ids 0..999).
IMAGENET_TASKS: dict[str, list[int]] = {
    "bird_passerine": list(range(10, 21)),
    "bird_aquatic1": [*range(97, 101), *range(127, 135)],
    "bird_aquatic2": list(range(135, 147)),
    "bird_etc1": list(range(87, 97)),
}
IMAGENET_DEFAULT = list(IMAGENET_TASKS)


@dataclass(frozen=True)
class Query:
    """A composite task: primitive tasks in the user's order, classes placed in ascending class id.

    ``positions`` maps the experts' concatenated outputs (query order, each task's own class order)
    to the ascending class-id layout of the composite model's output.
    """

    tasks: tuple[str, ...]
    task_classes: tuple[tuple[int, ...], ...]

    @property
    def concat_classes(self) -> list[int]:
        return [c for cls in self.task_classes for c in cls]

    @property
    def classes(self) -> list[int]:
        return sorted(self.concat_classes)

    @property
    def num_classes(self) -> int:
        return len(self.concat_classes)

    @property
    def order(self) -> list[int]:
        """Index into the concatenated expert outputs for each output position (ascending class id)."""
        concat = self.concat_classes
        return sorted(range(len(concat)), key=concat.__getitem__)

    def owner(self) -> list[int]:
        """For each output position, the index (in ``tasks``) of the expert that produces it."""
        who = [i for i, cls in enumerate(self.task_classes) for _ in cls]
        return [who[j] for j in self.order]


def make_query(names: Sequence[str], table: Mapping[str, Sequence[int]], dataset: str = "") -> Query:
    """Validate task names against ``table`` and build the composite query."""
    names = list(names)
    if not names:
        raise PoEError(f"empty query: name at least one task; known tasks: {', '.join(table)}")
    unknown = [n for n in names if n not in table]
    if unknown:
        where = f" for {dataset}" if dataset else ""
        raise PoEError(f"unknown task {unknown[0]!r}{where}; known tasks: {', '.join(table)}")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise PoEError(f"task {n!r} is named twice in the query; name each task once")
        seen.add(n)
    classes = [tuple(table[n]) for n in names]
    flat = [c for cls in classes for c in cls]
    if len(set(flat)) != len(flat):
        raise PoEError(f"tasks {', '.join(names)} share classes; a composite task needs disjoint tasks")
    return Query(tuple(names), tuple(classes))


def check_disjoint(table: Mapping[str, Iterable[int]]) -> None:
    """Raise if any class belongs to two tasks (consolidation places each class once)."""
    seen: dict[int, str] = {}
    for name, cls in table.items():
        for c in cls:
            if c in seen:
                raise ValueError(f"class {c} is in both {seen[c]!r} and {name!r}")
            seen[c] = name
