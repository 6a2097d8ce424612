"""Your own Oracle: an ONNX model (``.onnx``), or, only when you trust it as code, a ``torch.export`` program
(``.pt2``) or a TorchScript file, mapping images to logits.

The model takes float RGB in [0, 1], N x 3 x S x S at the dataset's image size (what the pools' own ``--export``
writes), and returns N x C logits over the dataset's classes: in the dataset's class order, or in the order an
``--oracle_classes`` file gives (one class name per line, or a JSON list). An ONNX file is data: it is inspected
with the ``onnx`` package (no external data, no custom-op domain, a bounded size) and run by onnxruntime, which
executes only its operators. A ``.pt2`` or TorchScript file is a program: loading or calling it can run code
of the file's choosing (``torch.export.load`` evaluates guard code and sympy strings from the archive;
TorchScript can read and write files), so it is refused unless ``--trust_oracle_code`` says it is yours. Every
call is bounded in time (``Watchdog``). The Oracle is checked on a batch of test images (output shape, finite
values) before any training, and scored on the test split. Nothing is fetched from a hub.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import re
import sys
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.core.datasets import DatasetConfig, class_index
from PoE.core.errors import PoEError

FORMATS = "an ONNX model (.onnx)"
PROGRAMS = "a torch.export program (.pt2) or TorchScript file (.pt, .ts)"
TRUST = (
    f"{PROGRAMS} is code and can do anything you can: give --trust_oracle_code to run it as yours, or export "
    "the model as ONNX (torch.onnx.export(model, (x,), dynamo=True).save('oracle.onnx'))"
)
MAX_ONNX_BYTES = 1 << 30  # an Oracle's weights and graph; protobuf itself stops at 2 GB
ONNX_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")  # the operator sets built into onnxruntime
TIME_VAR = "POE_ORACLE_SECONDS"  # overrides the time one call into the Oracle may take per 8 images
DEFAULT_SECONDS = 120.0


def seconds_per_8() -> float:
    """How long the Oracle may take per 8 images (at least one call's worth): ``$POE_ORACLE_SECONDS``, else 120."""
    given = os.environ.get(TIME_VAR)
    if not given:
        return DEFAULT_SECONDS
    try:
        value = float(given)
        if not 0 < value < 1e6:
            raise ValueError
        return value
    except ValueError:
        raise PoEError(f"${TIME_VAR}={given!r}: expected a positive number of seconds") from None


def first_line(e: BaseException, width: int = 100) -> str:
    """An exception as one short line: torch and onnxruntime messages span several lines (a TorchScript error's
    cause is its last line, after the script's traceback)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("The following operation failed in the TorchScript interpreter"):
        return lines[-1][:width]  # "RuntimeError: ..."
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(lines))
    return f"{type(e).__name__}: {text[:width] if text else 'no message'}"


def hard_exit(message: str) -> None:
    """End the process with the one-line error a ``PoEError`` prints: a running program cannot be stopped."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    os._exit(PoEError.exit_code)


class Watchdog:
    """Bounds one call into the user's Oracle, so that an endless loop ends the run instead of hanging it. After
    ``seconds`` it calls ``stop`` (onnxruntime's terminate flag: the call then raises and ``fired`` is set); a
    call that still runs at twice that, or at once without ``stop`` (Python cannot interrupt a torch program),
    ends the process with ``message`` as its one-line error, exit 2."""

    def __init__(self, seconds: float, message: str, stop: Callable[[], None] | None = None) -> None:
        self.fired = False
        self.timers = [threading.Timer(2 * seconds if stop else seconds, hard_exit, (message,))]
        if stop is not None:
            self.timers.append(threading.Timer(seconds, self._fire, (stop,)))
        for t in self.timers:
            t.daemon = True

    def _fire(self, stop: Callable[[], None]) -> None:
        self.fired = True
        stop()

    def __enter__(self) -> Watchdog:
        for t in self.timers:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for t in self.timers:
            t.cancel()


class ProgramOracle(nn.Module):
    """The user's Oracle as the stages call it: normalised images in, logits in class-id order out. Every call
    is bounded in time, and a failure is a one-line error."""

    def __init__(self, program: Any, cfg: DatasetConfig, order: list[int] | None, path: Path, seconds: float) -> None:
        super().__init__()
        self.program = [program]  # not a submodule: an exported program refuses .train()/.eval()
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1))
        self.order = None if order is None else torch.tensor(order)  # dataset class c = program output order[c]
        self.path, self.size, self.seconds = path, cfg.image_size, seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, size = len(x), f"3 x {self.size} x {self.size}"
        seconds = self.seconds * max(1.0, n / 8)
        late = (
            f"--oracle {self.path} did not finish a batch of {n} images in {seconds:g} s (an endless loop?); "
            f"${TIME_VAR} sets the seconds it may take per 8 images (now {self.seconds:g})"
        )
        x = (x.float() * self.std + self.mean).contiguous()
        try:
            if isinstance(self.program[0], OnnxProgram):
                out = self.program[0].run(x, seconds, late)
            else:
                with Watchdog(seconds, late):
                    out = self.program[0](x)
        except PoEError:
            raise
        except Exception as e:
            raise PoEError(
                f"--oracle {self.path} failed on a batch of {n} images of {size} ({first_line(e, 120)}); "
                f"it must take float RGB in [0, 1], N x {size} (the dataset's image size: --image_size "
                "for a folder)"
            ) from None
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
                raise PoEError(
                    f"--oracle {path}: not a torch.export archive of this PyTorch's format (no weights "
                    "config); save it with torch.export.save"
                )
            for name in configs:
                for fqn, meta in json.loads(z.read(name))["config"].items():
                    if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise PoEError(
                            f"--oracle {path}: {fqn} is stored as a pickled object, which is not loaded; "
                            "export plain tensors"
                        )
            for name in names:
                if "/sample_inputs/" in name:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)  # raises if only pickle could load it
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise PoEError(f"--oracle {path}: cannot load it as {PROGRAMS} ({type(e).__name__})") from None


class OnnxProgram:
    """An ONNX Oracle in an onnxruntime session: torch tensors in and out (on the caller's device), each run
    under a ``Watchdog`` that sets the run's terminate flag."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def run(self, x: torch.Tensor, seconds: float, message: str) -> torch.Tensor:
        import onnxruntime as ort

        options = ort.RunOptions()
        options.log_severity_level = 4  # its errors come back as exceptions; it would also log them
        feed = {self.input: x.detach().float().cpu().contiguous().numpy()}
        dog = Watchdog(seconds, message, stop=lambda: setattr(options, "terminate", True))
        try:
            with dog:
                out = self.session.run(None, feed, options)[0]
        except Exception:
            if dog.fired:
                raise PoEError(message) from None
            raise
        return torch.from_numpy(out).to(x.device)


def onnx_parts(model: Any) -> tuple[list[Any], list[Any]]:
    """Every node and every tensor of an ONNX model: the graph's, its functions', and those of every subgraph
    (Loop, If and Scan bodies), whatever an attribute's declared type says."""
    nodes, tensors, graphs = [], [], [model.graph]
    pending = [n for f in model.functions for n in f.node]
    while graphs or pending:
        if graphs:
            g = graphs.pop()
            tensors += [*g.initializer, *(t for s in g.sparse_initializer for t in (s.values, s.indices))]
            pending += g.node
            continue
        node = pending.pop()
        nodes.append(node)
        for a in node.attribute:
            graphs += [a.g] if a.HasField("g") else []
            graphs += a.graphs
            tensors += ([a.t] if a.HasField("t") else []) + list(a.tensors)
            sparse = ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors)
            tensors += [t for s in sparse for t in (s.values, s.indices)]
    return nodes, tensors


def check_onnx(path: Path, data: bytes) -> None:
    """Refuse an ONNX model that would make onnxruntime read another file (external data: its location can name
    any file) or load operator code (a custom domain), or that does not take one float tensor."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise PoEError(f"--oracle {path}: not an ONNX model ({first_line(e)}); expected {FORMATS}") from None
    nodes, tensors = onnx_parts(model)
    external = next((t for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data), None)
    if external is not None:
        raise PoEError(
            f"--oracle {path}: tensor {external.name!r} keeps its data in another file, which is not "
            "read; save the model with its weights inside (onnx.save(model, f, "
            "save_as_external_data=False))"
        )
    local = {f.domain for f in model.functions}
    foreign = sorted({n.domain for n in nodes if n.domain not in ONNX_DOMAINS and n.domain not in local})
    if foreign:
        raise PoEError(
            f"--oracle {path}: uses operators of domain {foreign[0]!r}, which need a custom-op library "
            f"that is not loaded; use operators of {', '.join(repr(d) for d in ONNX_DOMAINS)}"
        )
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    floats = [i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in inputs]
    if floats != [True]:
        what = f"{len(inputs)} inputs" if len(inputs) != 1 else "an input that is not a float32 tensor"
        raise PoEError(
            f"--oracle {path}: takes {what}; the Oracle must take one float32 tensor (RGB in [0, 1], "
            "N x 3 x S x S) and return N x C logits"
        )


def load_onnx(path: Path, device: torch.device, seconds: float) -> OnnxProgram:
    """The ONNX model in ``path``, inspected (``check_onnx``) and given to onnxruntime as the bytes inspected:
    the CUDA provider for a CUDA device where onnxruntime has it, else the CPU."""
    size = path.stat().st_size
    if size > MAX_ONNX_BYTES:
        raise PoEError(
            f"--oracle {path}: {size / 1e9:.1f} GB, over the limit of {MAX_ONNX_BYTES / 1e9:.1f} GB for an ONNX Oracle"
        )
    with path.open("rb") as f:
        data = f.read(MAX_ONNX_BYTES + 1)
    if len(data) > MAX_ONNX_BYTES:
        raise PoEError(f"--oracle {path}: grew over {MAX_ONNX_BYTES / 1e9:.1f} GB while it was read")
    check_onnx(path, data)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.add_session_config_entry("session.load_model_format", "ONNX")  # the bytes inspected, never ORT format
    options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        with Watchdog(seconds, f"--oracle {path}: onnxruntime did not load it in {seconds:g} s"):
            return OnnxProgram(ort.InferenceSession(data, sess_options=options, providers=providers))
    except Exception as e:
        raise PoEError(f"--oracle {path}: onnxruntime cannot load it ({first_line(e)})") from None


def load_program(path: Path, trust: bool = False, device: torch.device | str = "cpu", seconds: float = 120.0) -> Any:
    """The Oracle in ``path``: an ``OnnxProgram``, or with ``trust`` a torch program on ``device``; any other file,
    and a torch program without ``trust``, is a one-line error before anything of it is loaded."""
    device = torch.device(device)
    if not path.exists():
        raise PoEError(f"--oracle {path}: no such file; expected {FORMATS}")
    if not path.is_file():
        raise PoEError(f"--oracle {path}: not a regular file; expected {FORMATS}")
    if path.suffix.lower() == ".onnx":
        return load_onnx(path, device, seconds)
    if not trust:
        raise PoEError(f"--oracle {path}: {TRUST}")
    try:
        with warnings.catch_warnings():  # deprecation and pickle-protocol warnings: a refusal is one line
            warnings.simplefilter("ignore")
            if path.suffix == ".pt2":
                check_archive(path)
                quiet = logging.getLogger("torch.export")  # it logs a traceback of its own before raising
                level, quiet.level = quiet.level, logging.CRITICAL
                try:
                    return torch.export.load(str(path)).module().to(device)
                finally:
                    quiet.setLevel(level)
            return torch.jit.load(str(path), map_location="cpu").eval().to(device)
    except PoEError:
        raise
    except Exception as e:  # torch raises many kinds (RuntimeError, zip errors, KeyError) for foreign files
        raise PoEError(f"--oracle {path}: cannot load it as {PROGRAMS} ({first_line(e)})") from None


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
        raise PoEError(
            f"--oracle_classes {path}: lists {len(set(ids))} distinct classes of {len(ids)} lines; the "
            f"Oracle must score each of {cfg.name}'s {cfg.num_classes} classes once"
        )
    where = {c: j for j, c in enumerate(ids)}
    return [where[c] for c in range(cfg.num_classes)]


def check_program(model: nn.Module, x: torch.Tensor, cfg: DatasetConfig, path: Path) -> None:
    """Run the Oracle on a batch of normalised images: N x num_classes finite logits, else a one-line error."""
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), cfg.num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise PoEError(
            f"--oracle {path} returned {got} for {len(x)} images; expected logits of shape "
            f"({len(x)}, {cfg.num_classes}), one per {cfg.name} class"
        )
    if not bool(torch.isfinite(out).all()):
        raise PoEError(f"--oracle {path} returned NaN or infinite logits on {len(x)} test images")
