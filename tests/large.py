"""Folders of large images for the tests (tests/test_large_images.py, tests/test_onnx.py): four Tiny-ImageNet
classes upscaled to 96 pixels, and the original Tiny-ImageNet release's WRN-16-2 exported as their ONNX Oracle, both
made by scripts/tiny_large_folder.py (the fixtures ``large_folder`` and ``oracle_file`` are in conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from PoE.cli import main_preprocessing

from .conftest import ROOT, folder_argv

WNIDS = ["n01443537", "n01629819", "n01641577", "n01644900"]  # goldfish, fire salamander, bullfrog, tailed frog
SIZE = 96
TASKS = {"fish": ["goldfish"], "frogs": ["bullfrog", "tailed frog"], "salamander": ["European fire salamander"]}
FAST = (
    "--profile quick --epochs 1 --teacher_views 1 --batch_size 40 --no_progress --device cpu --precision fp32"
).split()


def maker():
    spec = importlib.util.spec_from_file_location("tiny_large_folder", ROOT / "scripts" / "tiny_large_folder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(folder: Path, tmp: Path, *extra: str) -> int:
    return main_preprocessing(folder_argv(folder, tmp, FAST, *extra))
