"""The CPU server's forward engine: the served library and experts as onnxruntime sessions.

On a few 32x32 images torch spends most of a forward dispatching operations (docs/service.md, "Where the time goes");
onnxruntime runs the same folded fp32 graphs for a fraction of that. The sessions are made in memory from the
batcher's private torch copies (``batching.Served``) by the TorchScript-based ONNX exporter, one module at a time on a
background thread, once a module has run ``after`` forwards (a server that answers a few requests never pays for
an export; a busy one has its sessions within its first few hundred requests). Until a module's session is ready
its torch copy serves, so nothing waits for them. Logits agree with the torch copies within 1e-4 (tests/test_engine.py).
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from PoE.core.choices import ENGINES

log = logging.getLogger("PoE.query.service")


def onnxruntime_installed() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def chosen(engine: str, device: torch.device, precision: str) -> str:
    """The engine ``engine`` means for a pool on ``device`` at ``precision``: ``onnx`` or ``torch``."""
    if engine not in ENGINES:
        from PoE.core.errors import PoEError

        raise PoEError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    fits = device.type == "cpu" and precision == "fp32"
    if engine == "onnx" and not fits:
        from PoE.core.errors import PoEError

        raise PoEError(f"--engine onnx runs fp32 on a CPU, not {precision} on {device}; use --engine torch or auto")
    if engine == "auto":
        return "onnx" if fits and onnxruntime_installed() else "torch"
    return engine


class Session:
    """An onnxruntime session of one module: a float32 tensor in (any batch size), a float32 tensor out."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...], threads: int) -> None:
        import onnxruntime as ort

        buf = io.BytesIO()
        with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is not the dynamo one
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (torch.zeros(1, *shape),),
                buf,
                dynamo=False,
                input_names=["x"],
                output_names=["y"],
                dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, not spin
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"x": np.ascontiguousarray(x.numpy(), dtype=np.float32)})[0]
        return torch.from_numpy(out)


class Engine:
    """Makes sessions on one background thread, in the order asked. A session is made on the gate's forward side
    (``batching.ExportGate``): never while a ``torch.export`` or a cost count runs."""

    def __init__(self, gate: object, threads: int, after: int = 16) -> None:
        self.gate, self.threads, self.after = gate, threads, after
        self.jobs: queue.Queue[tuple[nn.Module, tuple[int, ...], Callable[[Session], None]] | None] = queue.Queue()
        self.made = 0
        threading.Thread(target=self.run, name="poe-engine", daemon=True).start()

    def close(self) -> None:
        self.jobs.put(None)

    def ask(self, module: nn.Module, shape: tuple[int, ...], ready: Callable[[Session], None]) -> None:
        """Make a session of ``module`` (inputs 1 x ``shape``), then call ``ready`` with it."""
        self.jobs.put((module, shape, ready))

    def run(self) -> None:
        torch.set_num_threads(1)
        while (job := self.jobs.get()) is not None:
            module, shape, ready = job
            try:
                with self.gate.forward():
                    session = Session(module, shape, self.threads)
            except Exception as e:  # the torch copy keeps serving it
                log.warning("no onnxruntime session for a served module (%s); torch runs it", e)
                continue
            ready(session)
            self.made += 1
