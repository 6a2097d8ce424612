"""A task-specific model: the library and the queried experts consolidated, with its predictions, accuracy, cost
and export (``.pt2`` by ``torch.export``, ``.onnx`` by ``PoE.query.onnx_export``). ``Pool.query`` makes one."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from PoE.core.checkpoint import atomic_write, check_writable
from PoE.core.consolidate import ConsolidatedNet, RawInput
from PoE.core.data import ImageSet, Normalizer, image_batch
from PoE.core.datasets import DatasetConfig
from PoE.core.errors import PoEError
from PoE.core.evaluate import accuracy, batched_logits, check_covered, count_macs, count_params
from PoE.core.networks import Family, family_of
from PoE.core.precision import ieee_fp32
from PoE.core.query import Query
from PoE.core.runtime import Runtime

if TYPE_CHECKING:
    from PoE.query.pool import Pool


@dataclass
class Prediction:
    """Per image: the predicted class id and name, and the probabilities over ``classes``."""

    class_ids: list[int]
    class_names: list[str]
    probabilities: torch.Tensor  # N x len(classes), float32, CPU
    classes: list[int] = field(default_factory=list)  # the query's classes, ascending id
    names: list[str] = field(default_factory=list)  # their names

    def top(self, i: int, k: int = 3) -> list[dict[str, Any]]:
        """The ``k`` most probable classes of image ``i``: id, name, probability."""
        n, width = self.probabilities.shape
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise PoEError(f"top(i={i!r}): i must be an image index, 0..{n - 1}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PoEError(f"top(k={k!r}): k must be an integer >= 1 (at most {width} classes are returned)")
        p, idx = self.probabilities[i].topk(min(k, self.probabilities.shape[1]))
        return [
            {"id": self.classes[j], "name": self.names[j], "probability": round(float(q), 6)}
            for q, j in zip(p.tolist(), idx.tolist(), strict=True)
        ]


class TaskModel:
    """The consolidated model of one query: ``module`` maps normalised images to logits over ``classes``
    (ascending class id). ``predict`` takes raw images; ``export`` writes a ``.pt2`` that takes [0, 1] RGB."""

    def __init__(
        self,
        module: ConsolidatedNet,
        query: Query,
        cfg: DatasetConfig,
        runtime: Runtime,
        build_ms: float,
    ) -> None:
        self.module, self.query, self.cfg, self.runtime = module, query, cfg, runtime
        self.build_ms = build_ms
        self.pool: Pool | None = None  # the pool it was built from (the service answers it from that pool's modules)
        self._cost: tuple[int, int] | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @property
    def tasks(self) -> list[str]:
        return list(self.query.tasks)

    @property
    def classes(self) -> list[int]:
        return list(self._classes)

    @property
    def class_names(self) -> list[str]:
        return list(self._names)

    @functools.cached_property
    def _classes(self) -> tuple[int, ...]:  # once per model: the server reads them for every request
        return tuple(self.query.classes)

    @functools.cached_property
    def _names(self) -> tuple[str, ...]:
        return tuple(self.cfg.class_name(c) for c in self._classes)

    def cost(self) -> tuple[int, int]:
        """(multiply-adds per image, parameters) of the consolidated model."""
        if self._cost is None:
            shape = (3, self.cfg.image_size, self.cfg.image_size)
            self._cost = (count_macs(self.module, shape, self.device), count_params(self.module))
        return self._cost

    def accuracy(self, test: ImageSet, progress: bool = False) -> tuple[float, int]:
        """(accuracy in %, images) on the test images of the query's classes, at the pool's precision. A split
        without images of some of them is refused (an accuracy over the others would pass for the query's)."""
        check_covered(test.y, self.classes, self.cfg.class_name)
        normalize = Normalizer(self.cfg.mean, self.cfg.std, self.device)
        return accuracy(self.module, test, self.classes, normalize, self.runtime, progress=progress)

    def logits(self, images: Any) -> torch.Tensor:
        """Logits over ``classes`` (CPU, float32) of user images (see ``predict``)."""
        x = image_batch(images, self.cfg.image_size)
        normalize = Normalizer(self.cfg.mean, self.cfg.std, self.device)
        return torch.cat([o.cpu() for o in batched_logits(self.module, x, normalize, self.runtime)])

    def predict(self, images: Any) -> Prediction:
        """``images``: uint8 H x W x 3 arrays (one, or a stack N x H x W x 3), PIL images, or float tensors in
        [0, 1] shaped 3 x H x W or N x 3 x H x W."""
        return self.prediction(self.logits(images))

    def prediction(self, logits: torch.Tensor) -> Prediction:
        """The prediction of logits over ``classes`` (from ``logits`` or from a batched forward elsewhere)."""
        probs = logits.float().cpu().softmax(1)
        pos = probs.argmax(1).tolist()
        names = self.class_names
        return Prediction([self.classes[p] for p in pos], [names[p] for p in pos], probs, self.classes, names)

    def export(
        self,
        path: str | Path,
        precision: str = "fp32",
        quantize: str | None = None,
        data_root: str | Path | None = None,
        calibration: int | None = None,
    ) -> None:
        """Write the model, in the format ``path``'s extension names: ``.pt2``, a ``torch.export`` program (CPU, fp32
        weights; ``bf16``: the graph runs under bfloat16 autocast), or ``.onnx`` (fp32; ``quantize="int8"``: int8,
        calibrated on ``data_root``'s training images of the query's classes, see ``PoE.query.onnx_export``).
        Either takes float RGB in [0, 1], N x 3 x S x S, and returns logits over ``classes``."""
        target = check_export_path(path)
        if target.suffix.lower() == ".onnx":
            from PoE.query import onnx_export

            if precision != "fp32":
                raise PoEError(f"{precision} is a .pt2 export precision; an .onnx file is fp32, or int8 with quantize")
            n = onnx_export.CALIBRATION_IMAGES if calibration is None else calibration
            data = onnx_export.onnx_bytes(self, quantize, data_root, n)
            atomic_write(target, lambda f: f.write(data))
            return
        if quantize is not None:
            raise PoEError(f"quantize={quantize!r} is for .onnx files; {target.name} is a .pt2 (torch.export) file")
        program = self.program(precision)
        atomic_write(target, lambda f: torch.export.save(program, f), buffered=True)

    def program(self, precision: str = "fp32") -> torch.export.ExportedProgram:
        """``export``'s program, in memory (the HTTP service keeps it as bytes: no disk, so no disk-full)."""
        # tracing must not touch shared modules
        family = family_of(self.cfg)
        module = private_copy(self.module, fold=precision == "fp32", family=family)
        wrapped = RawInput(module, self.cfg.mean, self.cfg.std, self.cfg.image_size, precision).eval()
        size = self.cfg.image_size  # a fixed example: the same model exports to the same archive in any process
        example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        dims = {0: torch.export.Dim("batch", min=1, max=1 << 16)}
        dims |= {i: torch.export.Dim(n, min=family.min_input, max=4096) for i, n in ((2, "height"), (3, "width"))}
        with torch.no_grad(), ieee_fp32():  # TF32 switches in the one state torch.export accepts, then restored
            return torch.export.export(wrapped, (example,), dynamic_shapes=(dims,))


def private_copy(module: nn.Module, fold: bool, family: Family) -> nn.Module:
    """A CPU copy in contiguous (not channels_last) layout, what ``torch.export.save`` stores cleanly; with
    ``fold``, BatchNorm folded into the convolutions it follows (fp32 only: folded weights rounded to bf16 move
    more predictions than bf16 without folding, docs/precision.md)."""
    import copy

    module = copy.deepcopy(module).cpu().eval()
    return (family.fold(module) if fold else module).to(memory_format=torch.contiguous_format)


EXPORT_FORMATS = (".pt2", ".onnx")


def check_export_path(path: str | Path) -> Path:
    """Refuse, before any work, a path that cannot be written (a folder, a missing or read-only parent) or whose
    extension names no format (``EXPORT_FORMATS``)."""
    if not str(path).strip():
        raise PoEError(f"--export needs a file name ending in {' or '.join(EXPORT_FORMATS)}, got an empty path")
    target = Path(path)
    if target.is_dir():
        raise PoEError(f"--export {path} is a folder; give a file name such as model.pt2 or model.onnx")
    if target.suffix.lower() not in EXPORT_FORMATS:
        raise PoEError(
            f"--export {path}: the extension names the format; accepted: FILE.pt2 (a torch.export "
            "program) or FILE.onnx (ONNX)"
        )
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise PoEError(f"cannot export to {path}: folder {parent} does not exist")
    try:
        check_writable(parent)
    except PoEError as e:
        raise PoEError(f"cannot export to {path}: {e}") from None
    return target
