"""A folder of large images and an exported Oracle for it, from real data: Tiny-ImageNet validation images of a few
classes upscaled to S pixels as a PNG image folder, and the original Tiny-ImageNet release's WRN-16-2 (its library
and the classifier trained with it; it reads the images downscaled back to 64 pixels) restricted to those classes
and saved as ONNX and with ``torch.export`` for S-pixel input. Used by tests/test_large_images.py and the run in
docs/large_images.md:

    python scripts/tiny_large_folder.py OUT --classes 10 --size 96 --train 40

writes OUT/images/{train,val}/<class name>/*.png, OUT/tasks.json (one task per group of classes), OUT/oracle.onnx and
the same network as OUT/oracle.pt2 (code: loaded only with --trust_oracle_code).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PoE.core.datasets import get_dataset  # noqa: E402
from PoE.core.datasets.tinyimagenet import class_names as read_names  # noqa: E402

class_names = functools.cache(read_names)  # read once: timm's metadata takes seconds


class Restricted(nn.Module):
    """A Tiny-ImageNet network on [0, 1] RGB of any size (resized to its 64 pixels), scoring ``cols`` only."""

    def __init__(self, net: nn.Module, cols: list[int]) -> None:
        super().__init__()
        cfg = get_dataset("tinyimagenet")
        self.net = net
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, 3, 1, 1))
        self.register_buffer("cols", torch.tensor(cols))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
        return self.net((x - self.mean) / self.std)[:, self.cols]


def write_folder(val: Path, out: Path, wnids: list[str], size: int, n_train: int) -> list[str]:
    """The first ``n_train`` validation images of each class in train/, the rest in val/, as ``size``-pixel PNGs;
    returns the class names (folder names)."""
    from PIL import Image

    names, all_wnids = class_names(), get_dataset("tinyimagenet").aliases
    files: dict[str, list[str]] = {w: [] for w in wnids}
    for line in (val / "val_annotations.txt").read_text().splitlines():
        file, wnid = line.split("\t")[:2]
        if wnid in files:
            files[wnid].append(file)
    for wnid, found in files.items():
        name = names[all_wnids.index(wnid)]
        for split, part in (("train", found[:n_train]), ("val", found[n_train:])):
            (out / split / name).mkdir(parents=True, exist_ok=True)
            for f in part:
                with Image.open(val / "images" / f) as im:
                    im.convert("RGB").resize((size, size), Image.BILINEAR).save(out / split / name / f"{f}.png")
    return [names[all_wnids.index(w)] for w in wnids]


def export_oracle(official: Path, folder_names: list[str], size: int, path: Path) -> None:
    """The official WRN-16-2 scoring ``folder_names`` in folder order (sorted), exported for ``size`` pixels: as
    ONNX for a ``.onnx`` path, else as a ``torch.export`` program."""
    from PoE.core.checkpoint import load_checkpoint
    from PoE.core.networks import WideResNet, WRNSpec

    net = WideResNet(WRNSpec(16, 2, first_stride=2), 200)
    net.front.load_state_dict(load_checkpoint(official / "library_TinyImageNet.pt"))
    net.back.load_state_dict(load_checkpoint(official / "library_student_classifier_TinyImageNet.pt"))
    names = class_names()
    model = Restricted(net.eval(), [names.index(n) for n in sorted(folder_names)]).eval()
    x, batch = torch.rand(2, 3, size, size), ({0: torch.export.Dim("n", min=1, max=4096)},)
    if path.suffix == ".onnx":  # the Oracle format --oracle loads without --trust_oracle_code
        torch.onnx.export(model, (x,), dynamo=True, verbose=False, dynamic_shapes=batch).save(str(path))
    else:
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=batch), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared", help="folder of data/ and official/")
    p.add_argument("--classes", type=int, default=10, help="the first N classes of wnids.txt's sorted order")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--train", type=int, default=40, help="images per class in train/ (of 50; the rest in val/)")
    p.add_argument("--task_size", type=int, default=2, help="classes per task of tasks.json")
    a = p.parse_args()
    wnids = sorted(get_dataset("tinyimagenet").aliases)[: a.classes]
    names = write_folder(a.shared / "data" / "tiny-imagenet-200" / "val", a.out / "images", wnids, a.size, a.train)
    groups = [names[i : i + a.task_size] for i in range(0, len(names), a.task_size)]
    (a.out / "tasks.json").write_text(json.dumps({f"group{i + 1}": g for i, g in enumerate(groups)}, indent=1))
    for oracle in (a.out / "oracle.onnx", a.out / "oracle.pt2"):
        export_oracle(a.shared / "official" / "tinyimagenet", names, a.size, oracle)
    print(
        f"wrote {a.out / 'images'} ({len(names)} classes at {a.size} px), {a.out / 'tasks.json'}, "
        f"{a.out / 'oracle.onnx'}, {a.out / 'oracle.pt2'}"
    )


if __name__ == "__main__":
    main()
