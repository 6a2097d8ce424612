"""Run_Service.py: answer a query from the pool (accuracy, cost, export), list the pool, or serve it over HTTP."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from PoE.cli.common import (
    POSITIVE_INT,
    WAIT_MS,
    Help,
    Parser,
    common_arguments,
    number,
    open_pool,
    read_pool_folder,
    run_main,
    runtime_of,
    tasks_epilog,
)
from PoE.core.choices import ENGINES
from PoE.core.errors import PoEError

if TYPE_CHECKING:
    from PoE.core.runtime import Runtime


def service_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Service.py",
        description="Answer a query (a set of primitive tasks) in real time: consolidate the shared library and "
        "the queried experts into one task-specific model, without training, and report its accuracy and cost. "
        "With --serve, keep the pool in memory and answer queries over HTTP (API and web page).",
        epilog=tasks_epilog(),
        formatter_class=Help,
    )
    common_arguments(p, precision="fp32")
    p.add_argument(
        "--queriedTask",
        nargs="*",
        default=None,
        metavar="TASK",
        help="primitive tasks of the query (the built-in datasets' tasks are listed below; --list shows their classes)",
    )
    p.add_argument("--list", action="store_true", help="list the pool's tasks and their classes, then exit")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object (last line)")
    p.add_argument(
        "--export",
        default=None,
        metavar="PATH",
        help="write the built model; the extension names the "
        "format: FILE.pt2 (torch.export) or FILE.onnx (ONNX: onnxruntime and other runtimes)",
    )
    p.add_argument(
        "--export_precision",
        default="fp32",
        choices=("fp32", "bf16"),
        help="the exported .pt2 graph's compute precision (weights stay fp32)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=("int8",),
        help="with --export FILE.onnx: int8 weights and "
        "activations (onnxruntime static quantization), calibrated on training images of the query's "
        "classes under --data_root",
    )
    p.add_argument(
        "--calibration_images",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="with --quantize: how many training images calibrate it (a seeded sample; default: 512)",
    )
    p.add_argument("--no_eval", action="store_true", help="build (and export) only; skip the test-set accuracy")
    http_arguments(p.add_argument_group("HTTP service"))
    return p


def http_arguments(g: argparse._ArgumentGroup) -> None:
    """``--serve`` and how the server runs: address, batching, threads, workers, Ray Serve."""
    g.add_argument("--serve", action="store_true", help="serve the pool over HTTP: API under /api, web page at /")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    g.add_argument(
        "--port",
        type=number(int, 0, high=65536),
        default=8000,
        help="TCP port (0: any free port; the URL line printed at start says which)",
    )
    g.add_argument("--max_batch", type=POSITIVE_INT, default=64, help="dynamic batching: most images per forward")
    g.add_argument(
        "--engine",
        default="auto",
        choices=ENGINES,
        help="what runs the forwards: onnxruntime sessions made from the pool's modules at start (fp32 on a CPU), or "
        "torch; auto: onnx where it applies and onnxruntime is installed, else torch",
    )
    g.add_argument(
        "--batch_wait_ms",
        type=WAIT_MS,
        default=5.0,
        help="dynamic batching: how long a batch may wait "
        "for requests still being received (a lone request never waits)",
    )
    g.add_argument(
        "--threads",
        type=POSITIVE_INT,
        default=None,
        help="torch threads per worker for the forwards (default: its share of the CPUs less one, 1 to 4)",
    )
    g.add_argument(
        "--workers",
        type=POSITIVE_INT,
        default=None,
        help="worker processes on the one port, each with the pool and its own batcher (default: one per two CPUs)",
    )
    g.add_argument(
        "--ray",
        action="store_true",
        help="serve as a Ray Serve deployment (pip install -r requirements-ray.txt); see docs/service.md for a cluster",
    )
    g.add_argument(
        "--replicas", type=POSITIVE_INT, default=None, help="with --ray: replicas of the deployment (default: 1)"
    )
    g.add_argument(
        "--ray_address",
        default=None,
        help="with --ray: an existing cluster (e.g. ray://HEAD:10001 or "
        "auto); default: a local Ray started by this command",
    )


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def list_pool(pool) -> int:
    info = pool.describe()
    print(f"pool {pool.root} ({pool.cfg.name}): {info['experts_present']} of {len(pool.cfg.tasks)} experts present")
    print(f"pool digest {pool.digest} (pin it with --pool_digest)")
    width = max(len(t) for t in pool.cfg.tasks)
    for t in info["tasks"]:
        mark = "yes" if t["present"] else "no "
        n = pool.expert_meta.get(t["name"], {}).get("test_n")  # a --test_limit run scores on fewer: say how many
        acc = f"  expert acc {t['accuracy']:.2f}%" if t["accuracy"] is not None else ""
        acc += f" on {n} test images" if acc and n else ""
        classes = ", ".join(f"{c['id']} {c['name']}" for c in t["classes"])
        print(f"  {t['name'].ljust(width)}  in pool: {mark}  classes [{classes}]{acc}")
    for note in pool.notes:
        print(f"note: {note}")
    return 0


def serve_body(a: argparse.Namespace, runtime: Runtime) -> int:
    """``--serve``: one process, ``--workers N`` or Ray Serve replicas, each opening the pool (pinned with
    ``--pool_digest``) itself."""
    from PoE.query.service import Settings, serve
    from PoE.query.service.engine import chosen

    # --engine onnx on a GPU or in bf16 is refused here, once, rather than by every worker as it starts
    chosen(a.engine, runtime.device, runtime.precision)
    device, precision = str(runtime.device), runtime.precision
    settings = Settings(
        a.db,
        a.dataset,
        device,
        precision,
        a.data_root,
        a.max_batch,
        a.batch_wait_ms,
        a.threads,
        a.pool_digest,
        a.engine,
    )
    if a.ray:
        if a.workers:
            raise PoEError("--workers is for the server without Ray; with --ray use --replicas N")
        from PoE.query.service.ray_serve import serve_ray

        return serve_ray(settings, a.host, a.port, a.replicas or 1, a.ray_address)
    if a.replicas or a.ray_address:
        raise PoEError("--replicas and --ray_address go with --ray; several processes on this machine: --workers N")
    return serve(settings, a.host, a.port, a.workers)


def service_body(a: argparse.Namespace) -> int:
    from PoE.core.datasets import load_split

    runtime = runtime_of(a)
    precision = runtime.precision
    if a.list:
        return list_pool(open_pool(read_pool_folder(a), runtime))
    if a.serve:
        return serve_body(a, runtime)
    if a.queriedTask is None:
        tasks = ", ".join(read_pool_folder(a, missing_ok=True).cfg.tasks)
        raise PoEError(f"name the query with --queriedTask TASK [TASK ...]; known tasks: {tasks}")
    if (a.quantize or a.calibration_images) and a.export is None:
        raise PoEError("--quantize and --calibration_images go with --export FILE.onnx")
    if a.calibration_images and not a.quantize:
        raise PoEError("--calibration_images goes with --quantize int8 (an fp32 export needs no calibration)")
    if a.export is not None:
        check_export(a)  # before any work: a path that cannot be written fails at once
    pool = open_pool(read_pool_folder(a), runtime)
    cfg = pool.cfg
    model = pool.query(a.queriedTask)
    macs, params = model.cost()
    result = {
        "tasks": model.tasks,
        "accuracy": None,
        "n_test": 0,
        "flops": macs,
        "params": params,
        "build_ms": round(model.build_ms, 3),
        "open_ms": round(pool.open_ms, 1),
        "classes": model.classes,
        "class_names": model.class_names,
        "pool": str(pool.root),
        "pool_digest": pool.digest,
        "precision": precision,
    }
    if not a.no_eval:
        test = load_split(cfg, a.data_root, "test", classes=model.classes)
        acc, n = model.accuracy(test, progress=True)
        result["accuracy"], result["n_test"] = round(acc, 2), n
    if a.export is not None:
        model.export(a.export, a.export_precision, a.quantize, a.data_root, a.calibration_images)
        if a.export.lower().endswith(".onnx") and not a.no_eval:
            from PoE.query.onnx_export import OnnxModel, onnx_accuracy

            acc, n = onnx_accuracy(OnnxModel(a.export), test)
            result["export_accuracy"] = round(acc, 2)
    names = ", ".join(f"{c} {n}" for c, n in zip(model.classes, model.class_names, strict=True))
    rows = [
        ("dataset / pool", f"{cfg.name} / {pool.root}"),
        ("pool digest", pool.digest),
        ("query", f"{', '.join(model.tasks)} ({len(model.classes)} classes)"),
        ("classes", names),
        (
            "accuracy",
            "not evaluated (--no_eval)"
            if a.no_eval
            else f"{result['accuracy']:.2f}% on {result['n_test']} test images of the query's classes ({precision})",
        ),
        ("FLOPs", f"{human(macs)} multiply-adds per image (conv + linear)"),
        ("parameters", f"{human(params)} ({params:,})"),
        (
            "build time",
            f"{model.build_ms:.2f} ms (consolidating the pool in memory; no training; opening and "
            f"checking the pool took {pool.open_ms:.0f} ms)",
        ),
    ]
    if a.export is not None:
        rows.append(("exported", f"{a.export} ({exported_as(a)})"))
    if "export_accuracy" in result:
        rows.append(("its accuracy", f"{result['export_accuracy']:.2f}% on the same images (onnxruntime, CPU)"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    for note in pool.notes:
        print(f"note: {note}")
    if a.json:
        print(json.dumps(result))
    return 0


def check_export(a: argparse.Namespace) -> None:
    """The export flags agree with each other and the path can be written (PoEError otherwise)."""
    from PoE.query.model import check_export_path

    onnx = check_export_path(a.export).suffix.lower() == ".onnx"
    if onnx and a.export_precision != "fp32":
        raise PoEError("--export_precision bf16 is for .pt2 files; an .onnx file is fp32, or int8 with --quantize")
    if a.quantize and not onnx:
        raise PoEError(f"--quantize {a.quantize} writes an ONNX file: give --export FILE.onnx (got {a.export})")


def exported_as(a: argparse.Namespace) -> str:
    if a.export.lower().endswith(".onnx"):
        return "ONNX, " + (a.quantize or "fp32")
    return f"torch.export, {a.export_precision}"


def main_service(argv: Sequence[str] | None = None) -> int:
    return run_main(service_body, service_parser(), argv)
