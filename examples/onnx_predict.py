"""Predict images with a model exported by ``Run_Service.py --export FILE.onnx``: numpy, pillow and onnxruntime
only (no PyTorch, no PoE package).

    python examples/onnx_predict.py MODEL.onnx IMAGE_OR_FOLDER [--top K]

Each image is read as RGB, resized to the model's input size if it differs, scaled to [0, 1] and given to the
model; the top classes are printed by name (the class names are stored in the model's metadata). Bad input (a
file that is not such a model, an image that cannot be read) ends with one line ``error: ...`` and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
META_PREFIX = "poe."


class Refused(Exception):
    """Bad input: printed as one line, exit code 2."""


def load_model(path: Path):
    """An onnxruntime session and the class names, image size and tasks from the model's metadata."""
    import onnxruntime as ort

    if not path.is_file():
        raise Refused(f"no model file at {path}; give an .onnx file written by Run_Service.py --export FILE.onnx")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise Refused(
            f"{path} is not an ONNX model ({why}); give an .onnx file written by Run_Service.py --export FILE.onnx"
        ) from None
    meta = session.get_modelmeta().custom_metadata_map
    try:
        names = json.loads(meta[META_PREFIX + "class_names"])
        size = int(meta[META_PREFIX + "image_size"])
        tasks = json.loads(meta[META_PREFIX + "tasks"])
    except (KeyError, ValueError):
        raise Refused(
            f"{path} is an ONNX model without PoE's class metadata; give an .onnx file written by "
            "Run_Service.py --export FILE.onnx"
        ) from None
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or list(shape[1:]) != [3, size, size]:
        raise Refused(f"{path} takes input of shape {shape}, not N x 3 x {size} x {size} as its metadata says")
    return session, names, size, tasks


def image_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise Refused(f"no image files in folder {path}; accepted: {', '.join(sorted(IMAGE_SUFFIXES))}")
        return files
    if not path.is_file():
        raise Refused(f"no image file or folder at {path}")
    return [path]


def read_image(path: Path, size: int) -> np.ndarray:
    """3 x size x size float32 RGB in [0, 1]."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise Refused(
            f"cannot read {path} as an image ({type(e).__name__}); accepted: PNG, JPEG and other formats pillow reads"
        ) from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Top classes of images under an ONNX model exported by PoE.")
    p.add_argument("model", type=Path, help="the .onnx file (Run_Service.py --export FILE.onnx)")
    p.add_argument("images", type=Path, help="an image file, or a folder of them")
    p.add_argument("--top", type=int, default=3, help="classes shown per image (default: 3)")
    a = p.parse_args(argv)
    try:
        if a.top < 1:
            raise Refused(f"--top must be 1 or more, got {a.top}")
        session, names, size, tasks = load_model(a.model)
        files = image_files(a.images)
        x = np.stack([read_image(f, size) for f in files])
        name = session.get_inputs()[0].name
        probs = softmax(np.concatenate([session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)]))
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {a.model.name}: tasks {', '.join(tasks)}; {len(names)} classes")
    for f, row in zip(files, probs, strict=True):
        best = np.argsort(-row)[: a.top]
        print(f"{f.name}: " + ", ".join(f"{names[j]} {100 * row[j]:.2f}%" for j in best))
    return 0


if __name__ == "__main__":
    sys.exit(main())
