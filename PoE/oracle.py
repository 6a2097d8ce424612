"""Your own Oracle: a ``torch.export`` program (``.pt2``) or a TorchScript file mapping images to logits.

The program takes float RGB in [0, 1], N x 3 x S x S at the dataset's image size (what the pools' own
``--export`` writes), and returns N x C logits over the dataset's classes: in the dataset's class order, or in
the order an ``--oracle_classes`` file gives (one class name per line, or a JSON list). It is loaded without
Python pickle (``torch.jit.load``; ``torch.export.load`` once the archive is checked to hold no pickled part),
checked on a batch of test images (output shape, finite values) before any training, and scored on the test
split. Nothing is fetched from a hub.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.datasets import DatasetConfig
from PoE.errors import PoEError
from PoE.preprocess import StageRecord
from PoE.stages import Oracle, Part
from PoE.store import files_id
from PoE.tasks import class_index

FORMATS = "a torch.export program (.pt2) or a TorchScript file (.pt, .ts)"


class ProgramOracle(nn.Module):
    """The user's program as the stages call an Oracle: normalised images in, logits in class-id order out."""

    def __init__(self, program: Any, cfg: DatasetConfig, order: list[int] | None) -> None:
        super().__init__()
        self.program = [program]  # not a submodule: an exported program refuses .train()/.eval()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1))
        self.order = None if order is None else torch.tensor(order)  # dataset class c = program output order[c]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.program[0]((x.float() * self.std + self.mean).contiguous())
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out if self.order is None else out[:, self.order.to(out.device)]


def check_archive(path: Path) -> None:
    """Refuse a ``.pt2`` whose loading would unpickle: ``torch.export.load`` unpickles pickled weights or
    constants, custom objects, older archive formats, and sample inputs that ``weights_only`` refuses."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            configs = [n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))]
            if not configs or not any(n.endswith("/archive_format") for n in names):
                raise PoEError(f"--oracle {path}: not a torch.export archive of this PyTorch's format (no weights "
                               "config); save it with torch.export.save")  # fmt: skip
            for name in configs:
                for fqn, meta in json.loads(z.read(name))["config"].items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise PoEError(f"--oracle {path}: {fqn} is stored as a pickled object, which is not loaded; "
                                       "export plain tensors")  # fmt: skip
            for name in names:
                if "/sample_inputs/" in name:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)  # raises if only pickle could load it
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise PoEError(f"--oracle {path}: cannot load it as {FORMATS} ({type(e).__name__})") from None


def load_program(path: Path) -> Any:
    """The callable in ``path``; a file that is not one of ``FORMATS`` is a one-line error."""
    if not path.is_file():
        raise PoEError(f"--oracle {path}: no such file; expected {FORMATS}")
    try:
        if path.suffix == ".pt2":
            check_archive(path)
            quiet = logging.getLogger("torch.export")  # it logs a traceback of its own before raising
            level, quiet.level = quiet.level, logging.CRITICAL
            try:
                return torch.export.load(str(path)).module()
            finally:
                quiet.setLevel(level)
        with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; it still loads
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu").eval()
    except PoEError:
        raise
    except Exception as e:  # torch raises many kinds (RuntimeError, zip errors, KeyError) for foreign files
        why = str(e).strip().splitlines()[0][:100] if str(e).strip() else "no message"
        raise PoEError(f"--oracle {path}: cannot load it as {FORMATS} ({type(e).__name__}: {why})") from None


def class_order(path: Path, cfg: DatasetConfig) -> list[int]:
    """For each dataset class, the program output that scores it, from the program's list of class names."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PoEError(f"--oracle_classes {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        names = json.loads(text) if text.lstrip().startswith("[") else [n.strip() for n in text.splitlines()]
    except json.JSONDecodeError as e:
        raise PoEError(f"--oracle_classes {path}: not a JSON list ({e.msg}, line {e.lineno})") from None
    names = [n for n in names if n != ""]
    if not all(isinstance(n, str) for n in names):
        raise PoEError(f"--oracle_classes {path}: class names must be strings")
    index = class_index(cfg)
    unknown = [n for n in names if n not in index]
    if unknown:
        raise PoEError(f"--oracle_classes {path}: {unknown[0]!r} is not a {cfg.name} class")
    ids = [index[n][0] for n in names]
    if len(ids) != cfg.num_classes or len(set(ids)) != cfg.num_classes:
        raise PoEError(f"--oracle_classes {path}: lists {len(set(ids))} distinct classes of {len(ids)} lines; the "
                       f"Oracle must score each of {cfg.name}'s {cfg.num_classes} classes once")  # fmt: skip
    where = {c: j for j, c in enumerate(ids)}
    return [where[c] for c in range(cfg.num_classes)]


def check_program(model: nn.Module, x: torch.Tensor, cfg: DatasetConfig, path: Path) -> None:
    """Run the Oracle on a batch of normalised images: N x num_classes finite logits, else a one-line error."""
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        size = f"3 x {cfg.image_size} x {cfg.image_size}"
        raise PoEError(f"--oracle {path} failed on a batch of {len(x)} images of {size} ({type(e).__name__}: "
                       f"{str(e).strip()[:80]}); it must take float RGB in [0, 1], N x {size} (the dataset's image "
                       "size: --image_size for a folder)") from None  # fmt: skip
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), cfg.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PoEError(f"--oracle {path} returned {got} for {len(x)} images; expected logits of shape "
                       f"({len(x)}, {cfg.num_classes}), one per {cfg.name} class")  # fmt: skip
    if not bool(torch.isfinite(out).all()):
        raise PoEError(f"--oracle {path} returned NaN or infinite logits on {len(x)} test images")


class FileOracle(Oracle):
    """The Oracle stage with the user's program: loaded, checked, scored; never trained. Its id is the file's
    content hash, so the library and experts distilled from it (and the cached logits) are tied to it."""

    def load(self, key: str) -> Part:
        path = Path(self.s.oracle_file)
        order = class_order(Path(self.s.oracle_classes), self.cfg) if self.s.oracle_classes else None
        model = ProgramOracle(load_program(path).to(self.s.device), self.cfg, order).to(self.s.device).eval()
        test = self.prep.test_set
        check_program(model, self.prep.normalize(test.x[:8].to(self.s.device)), self.cfg, path)
        meta: dict[str, Any] = {"arch": f"file {path.name}", "file": str(path), "train_seconds": 0.0}
        meta["id"] = files_id([path] + ([Path(self.s.oracle_classes)] if self.s.oracle_classes else []))
        classes = self.prep.task_classes if self.cfg.streamed else None
        meta["test_acc"], meta["test_n"] = self.prep.evaluate(model, classes, restrict=self.cfg.streamed)
        return Part(model, meta)

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"Oracle ({part.meta['file']}, yours)", "all classes", part.meta)
        self.prep.report.stages["oracle"] = StageRecord.of(part.meta, weights=part.meta["file"])
