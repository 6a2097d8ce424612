"""ONNX export of a consolidated model, fp32 or int8, and reading an exported file back.

The file keeps the ``.pt2``'s input contract: float RGB in [0, 1], N x 3 x S x S (N dynamic), normalisation inside,
float32 logits over the query's classes in ascending class id. What a reader needs to name the outputs (class ids and
names, tasks, the pool's content id, the image size) is stored in the model's ``metadata_props``, so that a program
with onnxruntime alone (``examples/onnx_predict.py``) can print class names. An ONNX graph cannot refuse an input
with a message, so ``OnnxModel`` checks shape and range before running it.

int8: onnxruntime's static quantization in QDQ form (per-channel int8 weights, uint8 activations) of the
convolutions, its activation ranges calibrated on a seeded sample of training images of the query's classes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from PoE.core.consolidate import ConsolidatedNet, SideBySide
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PoE.core.data import ImageSet
    from PoE.query.model import TaskModel

INPUT, OUTPUT = "images", "logits"
QUANTIZE = ("int8",)
CALIBRATION_IMAGES = 512  # how many were needed: docs/onnx.md
CALIBRATION_SEED = 0
META_PREFIX = "poe."


class Normalised(nn.Module):
    """Float RGB in [0, 1] in, normalised here, float32 logits out (the range is checked by the reader)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std).float()


def export_module(model: TaskModel) -> nn.Module:
    """A private fp32 CPU copy of ``model``'s network (BatchNorm folded where the family folds it), experts apart."""
    from PoE.core.networks import family_of

    family = family_of(model.cfg)
    if model.pool is not None:
        experts = [model.pool.experts[t] for t in model.tasks]
        net: nn.Module = ConsolidatedNet(model.pool.library, SideBySide(experts), model.query)
    else:
        net = model.module
    net = copy.deepcopy(net).cpu().float().eval().to(memory_format=torch.contiguous_format)
    return Normalised(family.fold(net), model.cfg.mean, model.cfg.std).eval()


def metadata(model: TaskModel, precision: str, calibration: int = 0) -> dict[str, str]:
    """What a reader needs besides the graph, as metadata_props (strings; lists as JSON)."""
    pool_id = model.pool.part_id() if model.pool is not None else ""
    meta = {
        "format": "1",
        "dataset": model.cfg.name,
        "tasks": json.dumps(model.tasks),
        "class_ids": json.dumps(model.classes),
        "class_names": json.dumps(model.class_names),
        "pool_id": pool_id,
        "image_size": str(model.cfg.image_size),
        "input": f"float32 RGB in [0, 1], N x 3 x {model.cfg.image_size} x {model.cfg.image_size}",
        "output": "float32 logits over class_ids (ascending class id)",
        "precision": precision,
    }
    if calibration:
        meta["calibration_images"] = str(calibration)
    return {META_PREFIX + k: v for k, v in meta.items()}


def onnx_proto(model: TaskModel) -> Any:
    """The fp32 graph (``onnx.ModelProto``) by torch's exporter, the batch dimension dynamic."""
    wrapped = export_module(model)
    size = model.cfg.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:  # the exporter prints its steps on stdout: not the user's output
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(
                wrapped,
                (example,),
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamo=True,
                dynamic_shapes=({0: batch},),
                optimize=True,
                verbose=False,
            )
    finally:
        quiet.setLevel(level)
    return program.model_proto


def calibration_images(
    model: TaskModel, data_root: str | Path, n: int = CALIBRATION_IMAGES, seed: int = CALIBRATION_SEED
) -> np.ndarray:
    """A seeded sample of ``n`` training images of the query's classes, float32 in [0, 1], N x 3 x S x S. A missing
    training split is the dataset reader's one-line error."""
    from PoE.core.datasets import load_split

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PoEError(f"calibration images must be a positive number, got {n!r}")
    try:
        train = load_split(model.cfg, data_root, "train", progress=False, classes=model.classes)
    except PoEError as e:
        raise PoEError(f"int8 quantization calibrates on the training split of the query's classes: {e}") from None
    keep = torch.isin(train.y, torch.tensor(model.classes)).nonzero().flatten()
    if len(keep) == 0:
        raise PoEError(
            f"the training split under {data_root} has no images of the query's classes; int8 "
            "quantization calibrates on them"
        )
    pick = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:n]]
    return (train.x[pick].float() / 255).numpy()


def quantize_int8(proto: Any, images: np.ndarray, batch: int = 64, reduce_range: bool = True) -> Any:
    """onnxruntime static quantization of ``proto``'s convolutions (where the multiply-adds are): QDQ, per-channel
    int8 weights, uint8 activations whose ranges are calibrated (min / max) on ``images``. ``reduce_range`` keeps
    weights to 7 bits: x86 AVX2 int8 kernels (u8 x s8 pairs summed in int16) saturate with 8, which costs accuracy
    (docs/onnx.md)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT: images[i : i + batch]} for i in range(0, len(images), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs a warning per tensor it leaves alone
    try:
        with tempfile.TemporaryDirectory(prefix="poe_int8_") as tmp:
            fp32, pre, out = (Path(tmp) / f"{n}.onnx" for n in ("fp32", "pre", "int8"))
            onnx.save(proto, fp32)
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(out),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
                op_types_to_quantize=["Conv"],
            )
            return onnx.load(out)
    finally:
        quiet.setLevel(level)


def onnx_bytes(
    model: TaskModel,
    quantize: str | None = None,
    data_root: str | Path | None = None,
    calibration: int = CALIBRATION_IMAGES,
) -> bytes:
    """The serialized ONNX file of ``model``: fp32, or int8 (``quantize``, calibrated on ``data_root``'s training
    split), its metadata set."""
    if quantize not in (None, *QUANTIZE):
        raise PoEError(f"--quantize {quantize}: not a known quantization; accepted: {', '.join(QUANTIZE)}")
    images = None
    if quantize:
        if data_root is None:
            raise PoEError("int8 quantization needs data_root: it calibrates on training images of the query's classes")
        images = calibration_images(model, data_root, calibration)  # before the export: a missing split fails fast
    proto = onnx_proto(model)
    if images is not None:
        proto = quantize_int8(proto, images)
    meta = metadata(model, quantize or "fp32", 0 if images is None else len(images))
    compact(proto)
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name, proto.doc_string = "PoE", f"Pool of Experts model for {', '.join(model.tasks)}"
    return proto.SerializeToString()


def compact(proto: Any) -> None:
    """Leave the weights and the operations only: drop the exporter's stack traces and notes and the inferred shapes
    (runtimes infer them again), and give tensors and nodes short names (the graph's input and output keep theirs).
    The exporter's long names outweighed an int8 file's weights."""
    graph = proto.graph
    del graph.value_info[:], graph.metadata_props[:]
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        return names.setdefault(name, f"t{len(names)}")

    for t in graph.initializer:
        t.name = short(t.name)
    for i, node in enumerate(graph.node):
        if any(a.type in (5, 10) for a in node.attribute):  # GRAPH / GRAPHS: subgraphs would need the same renaming
            raise PoEError("the exported graph has subgraphs, which this exporter does not handle")
        del node.metadata_props[:]
        node.doc_string, node.name = "", f"n{i}"
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]


class OnnxModel:
    """An exported file, read back with onnxruntime (CPU): its metadata, and logits of checked inputs."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnx
        import onnxruntime as ort

        self.path = Path(path)
        try:
            data = self.path.read_bytes()
        except OSError as e:
            raise PoEError(f"cannot read {path}: {e.strerror or e}") from None
        try:
            proto = onnx.load_from_string(data)
            meta = {p.key.removeprefix(META_PREFIX): p.value for p in proto.metadata_props}
            self.image_size = int(meta["image_size"])
            self.class_ids, self.class_names = json.loads(meta["class_ids"]), json.loads(meta["class_names"])
            self.tasks = json.loads(meta["tasks"])
        except Exception:
            raise PoEError(
                f"{path} is not an ONNX model exported by PoE (Run_Service.py --export FILE.onnx); "
                "expected an .onnx file with its class metadata"
            ) from None
        self.meta = meta
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise PoEError(f"onnxruntime cannot load {path}: {str(e).splitlines()[0][:200]}") from None

    def logits(self, x: np.ndarray, batch: int = 256) -> np.ndarray:
        """Logits (N x classes, float32) of float RGB in [0, 1], N x 3 x S x S; anything else is refused."""
        check_input(x, self.image_size)
        x = np.ascontiguousarray(x, dtype=np.float32)
        return np.concatenate(
            [self.session.run([OUTPUT], {INPUT: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        )


def onnx_accuracy(model: OnnxModel, test: ImageSet, batch: int = 256) -> tuple[float, int]:
    """(accuracy in %, images) of an exported file on the test images of its classes, as ``TaskModel.accuracy``."""
    subset, labels = test.with_classes(model.class_ids)
    if len(labels) == 0:
        return float("nan"), 0
    right = 0
    for i in range(0, len(labels), batch):
        x = subset.x[i : i + batch].float().div_(255).numpy()
        right += int((model.logits(x).argmax(1) == labels[i : i + batch].numpy()).sum())
    return 100.0 * right / len(labels), len(labels)


def check_input(x: Any, size: int) -> None:
    """Refuse what the graph would answer wrong or fail on with a runtime's message: shape, type, range."""
    want = f"float RGB in [0, 1], N x 3 x {size} x {size}"
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise PoEError(
            f"input must be a float numpy array, {want}; got {type(x).__name__} {getattr(x, 'dtype', '')}".rstrip()
        )
    if x.ndim != 4 or x.shape[1:] != (3, size, size) or x.shape[0] == 0:
        raise PoEError(f"input must be {want}; got shape {x.shape}")
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise PoEError(
            f"input must be {want}; got values from {x.min():.3g} to {x.max():.3g} (divide 0..255 pixels by 255)"
        )
