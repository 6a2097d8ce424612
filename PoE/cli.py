"""Command lines of the entry scripts. ``main_*(argv)`` returns an exit code; errors are one line.

Building the parsers imports no torch (nor any module that does): ``--help`` and a bad flag answer at once, and
each command imports what it needs after parsing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PoE.datasets import DATASETS, DatasetConfig
from PoE.errors import PoEError
from PoE.profiles import KD_ALPHA, KD_T, METHODS, PAPER_LR, PRECISIONS, PROFILES, STAGES

if TYPE_CHECKING:
    import torch

    from PoE.baselines import BaselineRunner
    from PoE.data import ImageSet


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None, not already in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == []
        if empty or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Wrap each line of a description or epilog on its own (argparse joins them into one paragraph); a list
        of several lines (the tasks) hangs."""
        lines = text.splitlines()
        hang = indent + ("  " if len(lines) > 1 else "")
        fill = lambda line: textwrap.fill(line, width, initial_indent=indent, subsequent_indent=hang,  # noqa: E731
                                          break_on_hyphens=False, break_long_words=False)  # fmt: skip
        return "\n".join(map(fill, lines))


def tasks_epilog(default_tasks: bool = False) -> str:
    """The primitive tasks of every built-in dataset (and, with ``default_tasks``, the defaults), for --help."""
    lines = []
    for name, cfg in DATASETS.items():
        lines.append(f"{name} tasks ({len(cfg.tasks)}): {', '.join(cfg.tasks)}")
        if default_tasks:
            lines.append(f"{name} default tasks: {' '.join(cfg.default_tasks)}")
    return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (what was wrong and, for choices, what is accepted), exit 2."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def number(
    kind: type, low: float, low_ok: bool = True, high: float | None = None, high_ok: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` from ``low`` to ``high`` (``low_ok``/``high_ok``: the bound itself
    allowed), else a one-line error naming the flag and the accepted range: nan, inf and absurd values are
    refused here, not found out epochs later as a nan loss (or never)."""

    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        out = not math.isfinite(v) or v < low or (v == low and not low_ok)
        out = out or (high is not None and (v > high or (v == high and not high_ok)))
        if out:
            rng = f"{'>=' if low_ok else '>'} {low:g}" + (
                f" and {'<=' if high_ok else '<'} {high:g}" if high is not None else ""
            )
            raise argparse.ArgumentTypeError(
                f"must be {'a number' if kind is float else 'an integer'} {rng}, got {text}"
            )
        return v

    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = number(int, 1)
NONNEG_INT = number(int, 0)
FRACTION = number(float, 0, high=1)  # label smoothing, weight decay
LEARNING_RATE = number(float, 0, low_ok=False, high=10, high_ok=True)
TEMPERATURE = number(float, 0, low_ok=False, high=100, high_ok=True)
ALPHA = number(float, 0, high=1000, high_ok=True)
WAIT_MS = number(float, 0, high=10_000, high_ok=True)  # dynamic batching: at most 10 s
BUDGET = number(float, 0, low_ok=False, high=100, high_ok=True)  # a multiple of the paper's epochs


def pick_device(name: str | None) -> torch.device:
    import torch

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PoEError(f"unknown device {name!r}; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PoEError("--device cuda asked for, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise PoEError(f"unsupported device {name!r}; use cpu, cuda or cuda:<index>")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # batches have fixed shapes: let cuDNN time its algorithms once
    return dev


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (one line printed, code 2) or --help (code 0)
        return int(e.code or 0)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(args)
    except PoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into e.g. head
        return 0
    except KeyboardInterrupt:
        resumable = parser.prog == "Run_preprocessing.py"  # the only command whose work resumes where it stopped
        print("interrupted" + ("; run the same command again to resume" if resumable else ""), file=sys.stderr)
        return 130


def common_arguments(p: argparse.ArgumentParser, precision: str = "auto") -> None:
    """Flags of every command. ``precision``: the default of --precision (fp32 for the commands that only
    score, so their accuracies are exact and the same on every machine)."""
    p.add_argument("--dataset", default="cifar100", choices=list(DATASETS), help="dataset of the pool")
    p.add_argument("--data_root", default="data", help="folder holding <dataset>/ (default: data)")
    p.add_argument("--db", default="DB_PoE", help="pool root; the pool is <db>/<dataset>/ (default: DB_PoE)")
    p.add_argument("--hierarchy", default=None, metavar="FILE", help="the primitive tasks as a JSON file {\"task\": "
                   "[\"class name\", ...]} (default: the one the pool stores, else the dataset's built-in tasks); "
                   "a pool keeps the hierarchy it was built with and refuses another")  # fmt: skip
    p.add_argument("--skip_bad_images", action="store_true", help="--dataset folder: skip unreadable images (each is "
                   "named on stderr) instead of stopping at the first")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default=precision, choices=PRECISIONS, help="bf16: bfloat16 autocast (weights, "
                   "optimizer state, BatchNorm statistics and losses stay fp32); auto: bf16 on a CUDA GPU or a CPU "
                   "with native bf16 (AVX512-BF16, AMX), fp32 elsewhere; fp32 is IEEE fp32 on a GPU too (TF32 off), so "
                   "it scores as on a CPU")  # fmt: skip


# ---------------------------------------------------------------------------- preprocessing
def per_profile(what: Callable[[object], object]) -> str:
    """``what`` of each profile, for a help text: 'paper: 200, quick: 1, ...' (or one value if they agree)."""
    values = {k: what(v) for k, v in PROFILES.items()}
    if len(set(values.values())) == 1:
        return f"the profile's: {next(iter(values.values()))} in every profile"
    return "the profile's: " + ", ".join(f"{k} {v}" for k, v in values.items())


def stage_values(field: str) -> Callable[[object], str]:
    """A profile's ``field`` of each stage, 'Oracle / library / experts', or once if they agree."""

    def values(prof: object) -> str:
        v = [str(getattr(getattr(prof, st), field)) for st in STAGES]
        return v[0] if len(set(v)) == 1 else " / ".join(v)

    return values


# measured: the paper's WRN-40-4 Oracle trains at 93 images/s in bf16 on 2 AVX512-BF16 cores (docs/speed.md)
PAPER_ON_CPU = (
    "the paper profile (the default) would run for days on a CPU (CIFAR-100's WRN-40-4 Oracle alone: 200 epochs "
    "of about 9 minutes each on 2 cores with bf16); on a CPU use --profile cpu (100 minutes measured on 2 cores)"
)


def preprocessing_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_preprocessing.py",
        description="Build the pool: train (or load) the Oracle, distill the library, extract one expert per "
        "primitive task by conditional KD. Finished stages are loaded; interrupted ones resume.",
        epilog=tasks_epilog(),
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--profile", default="paper", choices=list(PROFILES), help="schedule preset: " + "; ".join(
        f"{k}: {v.description}" for k, v in PROFILES.items()) + f". Note: {PAPER_ON_CPU}")  # fmt: skip
    p.add_argument(
        "--stages",
        nargs="+",
        default=list(STAGES),
        choices=STAGES,
        metavar="STAGE",
        help=f"stages to run, of {', '.join(STAGES)}",
    )
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="primitive tasks (default: all; the "
                   "built-in datasets' tasks are listed below)")  # fmt: skip
    p.add_argument("--retrain", nargs="*", default=[], choices=STAGES, metavar="STAGE", help="retrain these stages "
                   "even if done")  # fmt: skip
    p.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle and library student")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and augmented views")
    p.add_argument("--image_size", type=POSITIVE_INT, default=None, help="--dataset folder: the images' size in "
                   "pixels (default: the first training image's, when <= 64)")  # fmt: skip
    p.add_argument("--library_from", default=None, metavar="DB", help="start the pool from the library of this pool "
                   "(its id checked against --pretrained's library student): a new --hierarchy then trains only its "
                   "experts, on the Oracle's cached logits")  # fmt: skip
    p.add_argument("--oracle_arch", default=None, help="Oracle network, e.g. wrn-40-4 (default: the profile's)")
    p.add_argument("--oracle", default=None, metavar="FILE", help="your own Oracle instead of training one: a "
                   "torch.export program (.pt2) or TorchScript file mapping float RGB in [0, 1], N x 3 x S x S, to "
                   "logits over the dataset's classes (checked on a batch, scored on the test split)")  # fmt: skip
    p.add_argument("--oracle_classes", default=None, metavar="FILE", help="the --oracle's class order when it "
                   "differs from the dataset's: one class name per line, or a JSON list")  # fmt: skip
    for stage in STAGES:
        g = p.add_argument_group(f"{stage} stage (default: the profile's)")
        name = stage.rstrip("s")
        g.add_argument(f"--{name}_epochs", type=POSITIVE_INT, default=None, help="epochs")
        g.add_argument(f"--{name}_lr", type=LEARNING_RATE, default=None, help="peak learning rate")
        g.add_argument(f"--{name}_batch_size", type=POSITIVE_INT, default=None, help="batch size")
        g.add_argument(f"--{name}_schedule", default=None, choices=("step", "onecycle"), help="learning-rate schedule")
    p.add_argument("--epochs", type=POSITIVE_INT, default=None, help="epochs of every stage (default: "
                   f"{per_profile(stage_values('epochs'))}, for Oracle / library / experts)")  # fmt: skip
    p.add_argument("--batch_size", type=POSITIVE_INT, default=None, help="batch size of every stage (default: "
                   f"{per_profile(stage_values('batch_size'))})")  # fmt: skip
    p.add_argument("--weight_decay", type=FRACTION, default=None, help="weight decay of every stage (default: "
                   f"{per_profile(stage_values('weight_decay'))})")  # fmt: skip
    p.add_argument("--label_smoothing", type=FRACTION, default=None, help="Oracle cross-entropy label smoothing, "
                   f"in [0, 1) (default: {per_profile(lambda prof: prof.oracle.label_smoothing)})")  # fmt: skip
    p.add_argument("--T", type=TEMPERATURE, default=None, help="distillation temperature (default: "
                   f"{per_profile(lambda prof: prof.T)})")  # fmt: skip
    p.add_argument("--alpha", type=ALPHA, default=None, help="weight of L_scale (default: "
                   f"{per_profile(lambda prof: prof.alpha)})")  # fmt: skip
    p.add_argument("--loss", default="both", choices=("both", "soft", "scale"), help="expert loss: both "
                   "(L_soft + alpha L_scale), soft or scale")  # fmt: skip
    p.add_argument("--teacher_views", type=NONNEG_INT, default=None, help="augmented views whose Oracle logits are "
                   "cached and cycled through (0: run the Oracle on every batch; default: "
                   f"{per_profile(lambda prof: prof.teacher_views)})")  # fmt: skip
    p.add_argument(
        "--train_limit",
        type=POSITIVE_INT,
        default=None,
        help="train on a random subset of this many images (smoke tests)",
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument("--compile", nargs="+", default=["auto"], choices=("auto", "on", "off", *STAGES),
                   metavar="WHICH", help="torch.compile the training steps of these stages (on: all, off: none; "
                   "auto: the profile's, on CUDA only)")  # fmt: skip
    g = p.add_argument_group("pretrained Oracle and library (ImageNet)")
    g.add_argument("--oracle_weights", default=None, help="the Oracle's state dict file (default: torchvision's "
                   "ImageNet weights in the torch hub cache)")  # fmt: skip
    g.add_argument("--library_weights", default=None, help="a whole MobileNetV2 state dict file whose features[:18] "
                   "become the library (default: torchvision's ImageNet weights in the torch hub cache)")  # fmt: skip
    g.add_argument("--workers", type=NONNEG_INT, default=None, help="DataLoader workers decoding images (default: one "
                   "per core, at most 8)")  # fmt: skip
    return p


def preprocessing_settings(a: argparse.Namespace):
    from PoE.datasets import described_by_data, get_dataset
    from PoE.hierarchy import make_query
    from PoE.networks import check_arch
    from PoE.precision import resolve as resolve_precision
    from PoE.preprocess import STAGES, Settings
    from PoE.profiles import for_dataset, get_profile, override
    from PoE.tasks import build_hierarchy, given_hierarchy

    cfg = get_dataset(a.dataset)
    folders = [Path(a.db) / cfg.name, Path(a.pretrained) / cfg.name]  # a folder dataset's pool and Oracle
    cfg = described_by_data(cfg, Path(a.data_root), a.image_size, a.skip_bad_images, folders)
    hierarchy = build_hierarchy(cfg, Path(a.db) / cfg.name, given_hierarchy(a.hierarchy, cfg))
    cfg = hierarchy.apply(cfg)
    prof = for_dataset(get_profile(a.profile), cfg)
    tasks = list(cfg.tasks) if a.tasks is None else a.tasks
    make_query(tasks, cfg.tasks, cfg.name)  # validates names, duplicates, emptiness
    stages = {}
    for stage in STAGES:
        name = stage.rstrip("s")
        stages[stage] = override(
            getattr(prof, stage),
            epochs=getattr(a, f"{name}_epochs") or a.epochs,
            lr=getattr(a, f"{name}_lr"),
            batch_size=getattr(a, f"{name}_batch_size") or a.batch_size,
            schedule=getattr(a, f"{name}_schedule"),
            weight_decay=a.weight_decay,
        )
    stages["oracle"] = override(stages["oracle"], label_smoothing=a.label_smoothing)
    if a.oracle_classes and not a.oracle:
        raise PoEError("--oracle_classes gives the class order of an --oracle FILE; name the file too")
    if a.oracle and a.oracle_arch:
        raise PoEError("--oracle FILE is the Oracle; --oracle_arch names one to train: give one of them")
    oracle_arch = a.oracle_arch or prof.oracle_arch or cfg.oracle_arch
    try:
        check_arch(oracle_arch, cfg)
    except ValueError as e:
        raise PoEError(f"--oracle_arch: {e}") from None
    if a.oracle:
        oracle_arch = f"{Path(a.oracle).name} (yours)"
    views = prof.teacher_views if a.teacher_views is None else a.teacher_views
    if cfg.pretrained and views:
        raise PoEError(f"--teacher_views must be 0 for {cfg.name}: its images are streamed, the Oracle sees each batch")
    device = pick_device(a.device)
    precision = resolve_precision(a.precision, device)
    named = {"on": STAGES, "off": (), "auto": prof.compile if device.type == "cuda" else ()}
    compile_stages = [st for st in STAGES if any(st in named.get(c, (c,)) for c in a.compile)]
    return Settings(
        cfg=cfg,
        profile=prof,
        oracle_arch=oracle_arch,
        oracle=stages["oracle"],
        library=stages["library"],
        experts=stages["experts"],
        T=prof.T if a.T is None else a.T,
        alpha=prof.alpha if a.alpha is None else a.alpha,
        teacher_views=views,
        seed=a.seed,
        device=device,
        data_root=Path(a.data_root),
        db=Path(a.db),
        pretrained=Path(a.pretrained),
        tasks=tasks,
        stages=tuple(s for s in STAGES if s in a.stages),
        retrain=tuple(a.retrain),
        train_limit=a.train_limit,
        soft=a.loss in ("both", "soft"),
        scale=a.loss in ("both", "scale"),
        progress=not a.no_progress,
        command="python Run_preprocessing.py " + " ".join(a.argv),
        oracle_weights=Path(a.oracle_weights) if a.oracle_weights else None,
        library_weights=Path(a.library_weights) if a.library_weights else None,
        workers=a.workers,
        precision=precision,
        compile=tuple(compile_stages),
        hierarchy=hierarchy,
        library_from=Path(a.library_from) if a.library_from else None,
        oracle_file=Path(a.oracle) if a.oracle else None,
        oracle_classes=Path(a.oracle_classes) if a.oracle_classes else None,
    )


def preprocessing_body(a: argparse.Namespace) -> int:
    from PoE import distributed, stages
    from PoE.precision import describe

    s = preprocessing_settings(a)
    s.device = distributed.setup(s.device)  # under torchrun: join the process group, one GPU per process
    main, procs = distributed.is_main(), distributed.world()
    try:
        if main:
            print(f"Pool of Experts preprocessing: {s.cfg.name}, profile {s.profile.name}, Oracle {s.oracle_arch}, "
                  f"device {s.device}{f' x {procs} processes' if procs > 1 else ''}, "
                  f"stages {', '.join(s.stages)}; {describe(s.precision, a.precision, s.device)}"
                  f"{'; torch.compile: ' + ', '.join(s.compile) if s.compile else ''}")  # fmt: skip
            if s.profile.name == "paper" and s.device.type == "cpu":  # on stdout: an error stays one line on stderr
                print(f"warning: {PAPER_ON_CPU}")
        report = stages.run(s)
    finally:
        distributed.destroy()
    if not main:  # rank 0 reports
        return 0
    print()
    print(report.table())
    print(f"\nwall time of this run: {report.wall_seconds:.0f}s; teacher logits computed: "
          f"{report.teacher_cache_seconds:.0f}s; pool: {s.db / s.cfg.name}")  # fmt: skip
    return 0


def main_preprocessing(argv: Sequence[str] | None = None) -> int:
    return run_main(preprocessing_body, preprocessing_parser(), argv)


# ---------------------------------------------------------------------------- service
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
    p.add_argument("--queriedTask", nargs="*", default=None, metavar="TASK", help="primitive tasks of the query (the "
                   "built-in datasets' tasks are listed below; --list shows their classes)")  # fmt: skip
    p.add_argument("--list", action="store_true", help="list the pool's tasks and their classes, then exit")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object (last line)")
    p.add_argument("--export", default=None, metavar="PATH", help="write the built model with torch.export (.pt2)")
    p.add_argument("--export_precision", default="fp32", choices=("fp32", "bf16"), help="the exported graph's "
                   "compute precision (weights stay fp32)")  # fmt: skip
    p.add_argument("--no_eval", action="store_true", help="build (and export) only; skip the test-set accuracy")
    g = p.add_argument_group("HTTP service")
    g.add_argument("--serve", action="store_true", help="serve the pool over HTTP: API under /api, web page at /")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    g.add_argument("--port", type=number(int, 0, high=65536), default=8000, help="TCP port (0: any free port; the "
                   "URL line printed at start says which)")  # fmt: skip
    g.add_argument("--max_batch", type=POSITIVE_INT, default=64, help="dynamic batching: most images per forward")
    g.add_argument("--batch_wait_ms", type=WAIT_MS, default=5.0, help="dynamic batching: how long a batch may wait "
                   "for requests still being received (a lone request never waits)")  # fmt: skip
    g.add_argument("--threads", type=POSITIVE_INT, default=None, help="torch threads per worker for the forwards "
                   "(default: its share of the CPUs less one, 1 to 4)")  # fmt: skip
    g.add_argument("--workers", type=POSITIVE_INT, default=None, help="worker processes on the one port, each with "
                   "the pool and its own batcher (default: one per two CPUs)")  # fmt: skip
    g.add_argument("--ray", action="store_true", help="serve as a Ray Serve deployment (pip install -r "
                   "requirements-ray.txt); see docs/service.md for a cluster")  # fmt: skip
    g.add_argument("--replicas", type=POSITIVE_INT, default=None, help="with --ray: replicas of the deployment "
                   "(default: 1)")  # fmt: skip
    g.add_argument("--ray_address", default=None, help="with --ray: an existing cluster (e.g. ray://HEAD:10001 or "
                   "auto); default: a local Ray started by this command")  # fmt: skip
    return p


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def list_pool(pool) -> int:
    info = pool.describe()
    print(f"pool {pool.root} ({pool.cfg.name}): {info['experts_present']} of {len(pool.cfg.tasks)} experts present")
    width = max(len(t) for t in pool.cfg.tasks)
    for t in info["tasks"]:
        mark = "yes" if t["present"] else "no "
        acc = f"  expert acc {t['accuracy']:.2f}%" if t["accuracy"] is not None else ""
        classes = ", ".join(f"{c['id']} {c['name']}" for c in t["classes"])
        print(f"  {t['name'].ljust(width)}  in pool: {mark}  classes [{classes}]{acc}")
    for note in pool.notes:
        print(f"note: {note}")
    return 0


def open_pool(a: argparse.Namespace, device: torch.device, precision: str = "fp32"):
    from PoE.pool import Pool

    return Pool.open(a.db, a.dataset, device, precision, a.hierarchy, a.skip_bad_images)


def pool_tasks(a: argparse.Namespace) -> DatasetConfig:
    """The dataset with the tasks of the pool at ``--db`` (its stored hierarchy, checked against --hierarchy)."""
    from PoE.datasets import get_dataset
    from PoE.tasks import pool_config

    return pool_config(get_dataset(a.dataset), a.db, a.hierarchy, a.skip_bad_images)


def service_body(a: argparse.Namespace) -> int:
    from PoE.datasets import load_split
    from PoE.pool import check_export_path
    from PoE.precision import resolve as resolve_precision

    device = pick_device(a.device)
    precision = resolve_precision(a.precision, device)
    if a.list:
        return list_pool(open_pool(a, device, precision))
    if a.serve:
        from PoE.service import Settings, serve

        settings = Settings(a.db, a.dataset, str(device), precision, a.data_root, a.max_batch, a.batch_wait_ms,
                            a.threads)  # fmt: skip
        if a.ray:
            if a.workers:
                raise PoEError("--workers is for the server without Ray; with --ray use --replicas N")
            from PoE.service.ray_serve import serve_ray

            return serve_ray(settings, a.host, a.port, a.replicas or 1, a.ray_address)
        if a.replicas or a.ray_address:
            raise PoEError("--replicas and --ray_address go with --ray; several processes on this machine: --workers N")
        return serve(settings, a.host, a.port, a.workers)
    if a.queriedTask is None:
        tasks = ", ".join(pool_tasks(a).tasks)
        raise PoEError(f"name the query with --queriedTask TASK [TASK ...]; known tasks: {tasks}")
    if a.export:
        check_export_path(a.export)  # before any work: a path that cannot be written fails at once
    pool = open_pool(a, device, precision)
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
        "precision": precision,
    }
    if not a.no_eval:
        test = load_split(cfg, a.data_root, "test", classes=model.classes)
        acc, n = model.accuracy(test, progress=True)
        result["accuracy"], result["n_test"] = round(acc, 2), n
    if a.export:
        model.export(a.export, a.export_precision)
    names = ", ".join(f"{c} {n}" for c, n in zip(model.classes, model.class_names, strict=True))
    rows = [
        ("dataset / pool", f"{cfg.name} / {pool.root}"),
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
    if a.export:
        rows.append(("exported", f"{a.export} ({a.export_precision})"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    for note in pool.notes:
        print(f"note: {note}")
    if a.json:
        print(json.dumps(result))
    return 0


def main_service(argv: Sequence[str] | None = None) -> int:
    return run_main(service_body, service_parser(), argv)


# ---------------------------------------------------------------------------- evaluation over combinations
def evaluation_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Evaluation.py",
        description="Score a pool's train-free consolidated models over every combination of n of a list of "
        "tasks and print, per n, the mean +- std accuracy (over combinations), the share of errors that are "
        "cross-expert errors, and the models' multiply-adds and parameters.",
        epilog=tasks_epilog(default_tasks=True),
        formatter_class=Help,
    )
    common_arguments(p, precision="fp32")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="tasks to combine (default: the "
                   "dataset's six default tasks; with a hierarchy file, its first six)")  # fmt: skip
    p.add_argument(
        "--n", nargs="+", type=POSITIVE_INT, default=None, help="combination sizes (default: 2 .. len(tasks)-1)"
    )
    p.add_argument("--out", default=None, metavar="FOLDER", help="also write FOLDER/combinations.md and .csv (per n) "
                   "and FOLDER/combinations_all.csv (per combination)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="also print the per-n rows as one JSON list (last line)")
    return p


def chosen_tasks(a: argparse.Namespace) -> tuple[DatasetConfig, list[str]]:
    """The dataset and its tasks to combine (``--tasks``, default: the dataset's default tasks), checked."""
    from PoE.hierarchy import make_query

    cfg = pool_tasks(a)
    tasks = a.tasks or cfg.default_tasks
    make_query(tasks, cfg.tasks, cfg.name)
    return cfg, tasks


def evaluation_body(a: argparse.Namespace) -> int:
    from PoE.datasets import load_split
    from PoE.experiments import (
        SUMMARY_COLUMNS,
        combination_rows,
        markdown_table,
        pool_combinations,
        summarize,
        write_csv,
        write_table,
    )
    from PoE.hierarchy import make_query
    from PoE.precision import resolve as resolve_precision

    cfg, tasks = chosen_tasks(a)
    ns = a.n or list(range(2, len(tasks)))
    bad = [n for n in ns if not 1 <= n <= len(tasks)]
    if bad or not ns:
        raise PoEError(f"--n must be between 1 and the number of tasks ({len(tasks)}), got {bad or ns}")
    device = pick_device(a.device)
    pool = open_pool(a, device, resolve_precision(a.precision, device))
    test = load_split(pool.cfg, a.data_root, "test", classes=make_query(tasks, cfg.tasks).classes)
    results = pool_combinations(pool, tasks, ns, test, progress=True)
    rows = summarize(results)
    print(f"pool {pool.root}: {cfg.name}, tasks {', '.join(tasks)}")
    print(
        "accuracy: over each composite task's test images; mean and population std over combinations; "
        "multiply-adds and parameters: mean over combinations (tasks may differ in their numbers of classes)\n"
    )
    table = markdown_table(rows, SUMMARY_COLUMNS)
    print(table)
    if a.out:
        out = Path(a.out) / "combinations"
        write_table(out, table, rows)
        write_csv(f"{out}_all.csv", combination_rows(results))
        print(f"\nwrote {out}.md, {out}.csv, {out}_all.csv")
    if a.json:
        print(json.dumps(rows))
    return 0


def main_evaluation(argv: Sequence[str] | None = None) -> int:
    return run_main(evaluation_body, evaluation_parser(), argv)


# ---------------------------------------------------------------------------- baselines
def baselines_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Baselines.py",
        description="Train the paper's baselines for a query and print them beside PoE's train-free model: "
        "accuracy on the composite task, multiply-adds, parameters and the wall time to produce each model.",
        epilog=tasks_epilog(),
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--queriedTask", nargs="+", required=True, metavar="TASK", help="primitive tasks of the query")
    p.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                   help=f"of {', '.join(METHODS)}")  # fmt: skip
    p.add_argument("--T", type=TEMPERATURE, default=KD_T, help="distillation temperature")
    p.add_argument("--alpha", type=ALPHA, default=KD_ALPHA, help="weight of the L1 term of CKD")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON list (last line)")
    baseline_arguments(p)
    return p


def baseline_arguments(p: argparse.ArgumentParser) -> None:
    """How the baselines train: the flags Run_Baselines.py and Run_Experiments.py share (see BaselineConfig)."""
    g = p.add_argument_group("baselines' training")
    g.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle (ckd's teacher, the Oracle's "
                   "row); the per-task Scratch teachers of sd_scratch and uhc_scratch are cached under it")  # fmt: skip
    g.add_argument("--epochs", type=POSITIVE_INT, default=None, help="epochs of every method (default: the "
                   "paper's: 200 for scratch, sd, uhc; 100 for transfer, ckd)")  # fmt: skip
    g.add_argument("--budget", type=BUDGET, default=1.0, help="without --epochs: this fraction of the paper's "
                   "schedule for each method (200 epochs for scratch, sd, uhc; 100 for transfer, ckd)")  # fmt: skip
    g.add_argument("--lr", type=LEARNING_RATE, default=PAPER_LR, help="peak learning rate")
    g.add_argument("--batch_size", type=POSITIVE_INT, default=512, help="batch size")
    g.add_argument("--schedule", default="step", choices=("step", "onecycle"), help="step (x0.1 at 40%% and "
                   "80%%) or onecycle")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seeds weights and batch order (and Run_Experiments' "
                   "sample of combinations)")  # fmt: skip
    g.add_argument("--ckd_views", type=NONNEG_INT, default=0, help="ckd: cache the Oracle's logits for this many "
                   "augmented views of the query's images (0: the Oracle on every batch, as the paper)")  # fmt: skip
    g.add_argument("--no_progress", action="store_true", help="no progress bars")


def runners(
    a: argparse.Namespace,
    cfg: DatasetConfig,
    device: torch.device,
    train: Callable[[], ImageSet],
    test: ImageSet,
    T: float = KD_T,
    alpha: float = KD_ALPHA,
) -> Callable[[str], BaselineRunner]:
    """Method -> its BaselineRunner on the command line's schedule (``train()`` gives the training images)."""
    from PoE.baselines import BaselineConfig, baseline_runner
    from PoE.precision import resolve as resolve_precision

    how = BaselineConfig(pretrained=Path(a.pretrained), epochs=a.epochs, budget=a.budget, lr=a.lr,
                         batch_size=a.batch_size, schedule=a.schedule, T=T, alpha=alpha, seed=a.seed,
                         precision=resolve_precision(a.precision, device), ckd_views=a.ckd_views,
                         progress=not a.no_progress)  # fmt: skip
    return lambda method: baseline_runner(method, cfg, train(), test, device, lambda: open_pool(a, device), how)


def baselines_body(a: argparse.Namespace) -> int:
    from PoE.baselines import poe_row, result_row
    from PoE.datasets import load_split
    from PoE.experiments import markdown_table
    from PoE.hierarchy import make_query

    cfg = pool_tasks(a)
    query = make_query(a.queriedTask, cfg.tasks, cfg.name)
    device = pick_device(a.device)
    train = load_split(cfg, a.data_root, "train")
    test = load_split(cfg, a.data_root, "test")
    runner = runners(a, cfg, device, lambda: train, test, a.T, a.alpha)
    rows = [result_row(runner(method).run(method, list(query.tasks))) for method in a.method]
    try:
        rows.append(poe_row(open_pool(a, device), query, test))
    except PoEError as e:
        print(f"(no PoE row: {e})")
    cols = [("method", "method"), ("accuracy", "accuracy (%)"), ("n_test", "test images"), ("macs", "multiply-adds"),
            ("params", "parameters"), ("epochs", "epochs"), ("seconds", "time to produce (s)"),
            ("teacher_seconds", "+ teachers (s)")]  # fmt: skip
    print(f"query: {', '.join(query.tasks)} ({query.num_classes} classes); device {device}")
    print(markdown_table(rows, cols))
    if a.json:
        print(json.dumps(rows))
    return 0


def main_baselines(argv: Sequence[str] | None = None) -> int:
    return run_main(baselines_body, baselines_parser(), argv)


# ---------------------------------------------------------------------------- the paper's tables
def experiments_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="Run_Experiments.py",
        description="The paper's comparisons: for n tasks out of a list, the Oracle (restricted to the composite's "
        "classes), PoE and the training-based baselines: accuracy (mean +- std over combinations), multiply-adds, "
        "parameters and time per query; and the cross-expert error share of pools extracted with L_soft only, "
        "L_scale only and both. Writes Markdown and CSV tables and PNG plots.",
        epilog=tasks_epilog(default_tasks=True),
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="default: the dataset's six")
    p.add_argument("--n", nargs="+", type=POSITIVE_INT, default=[2, 3, 4, 5], help="combination sizes")
    p.add_argument("--methods", nargs="+", default=["oracle", "poe", *METHODS], choices=["oracle", "poe", *METHODS],
                   metavar="METHOD", help="oracle (restricted to each composite's classes), poe, and the baselines "
                   f"{', '.join(METHODS)}")  # fmt: skip
    p.add_argument("--combos_per_n", type=NONNEG_INT, default=2, help="baselines: a fixed seeded sample of this many "
                   "combinations per n (0: all); the Oracle and PoE are always scored on all")  # fmt: skip
    p.add_argument("--ablation", nargs="*", default=[], metavar="NAME=DB", help="pools for the cross-expert "
                   "table, e.g. soft=DB_soft scale=DB_scale (the --db pool is 'both')")  # fmt: skip
    p.add_argument("--out", default="addImg", metavar="FOLDER", help="folder for the tables and plots, and "
                   "baseline_runs.jsonl: each finished baseline run, reused by a rerun with the same settings (an "
                   "interrupted comparison continues; delete the file to train them again)")  # fmt: skip
    baseline_arguments(p)
    return p


def experiments_body(a: argparse.Namespace) -> int:
    from functools import cache

    from PoE.baselines import load_oracle, oracle_files
    from PoE.datasets import load_split
    from PoE.experiments import (
        METHOD_COLUMNS,
        compare,
        cross_expert_rows,
        markdown_table,
        plot_results,
        same_combination_rows,
        summarize_methods,
        write_csv,
        write_table,
    )
    from PoE.pool import Pool
    from PoE.precision import resolve as resolve_precision
    from PoE.store import check_writable, files_id

    cfg, tasks = chosen_tasks(a)
    check_writable(a.out)  # before any training: the record of finished runs and the tables go there
    if not a.n or any(not 1 <= n <= len(tasks) for n in a.n):
        raise PoEError(f"--n must be between 1 and the number of tasks ({len(tasks)}), got {a.n}")
    ablation = {}
    for item in a.ablation:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PoEError(f"--ablation takes NAME=DB pairs (e.g. soft=DB_soft), got {item!r}")
        ablation[name] = path
    device = pick_device(a.device)
    pool = open_pool(a, device)
    test = load_split(cfg, a.data_root, "test")
    train = cache(lambda: load_split(cfg, a.data_root, "train"))
    rows, poe = compare(pool, tasks, a.n, a.methods, test, oracle=lambda: load_oracle(a.pretrained, cfg, device),
                        baseline=runners(a, cfg, device, train, test), combos_per_n=a.combos_per_n, seed=a.seed,
                        progress=not a.no_progress, record=Path(a.out) / "baseline_runs.jsonl",
                        oracle_id=files_id(oracle_files(a.pretrained, cfg)))  # fmt: skip
    schedule_note = ""
    epochs_text = a.epochs or ("the paper's" if a.budget == 1 else f"{a.budget:g} x the paper's")
    if any(m in METHODS for m in a.methods):
        schedule_note = (
            f"baselines: {a.combos_per_n or 'all'} combination(s) per n (seed {a.seed}), SGD lr {a.lr}, batch "
            f"{a.batch_size}, {a.schedule} schedule, {epochs_text} epochs, trained in "
            f"{resolve_precision(a.precision, device)}"
            f"{f', ckd from {a.ckd_views} cached Oracle views' if a.ckd_views else ''}; every accuracy scored in fp32; "
        )
    summary = summarize_methods(rows)
    note = (f"{cfg.name}, pool {pool.root}, tasks {', '.join(tasks)}, device {device}. {schedule_note}"
            f"Oracle and PoE: every combination. PoE time = consolidating the pool held in memory (no training; "
            f"opening and checking the pool once took {pool.open_ms:.0f} ms).")  # fmt: skip
    table = markdown_table(summary, METHOD_COLUMNS)
    print(note + "\n\n" + table)
    out = Path(a.out)
    write_table(out / "composite_tasks", note + "\n\n" + table, summary)
    write_csv(out / "composite_tasks_all.csv", rows)
    paired = same_combination_rows(rows)
    if paired:
        ptable = markdown_table(paired, [(k, k) for k in paired[0]])
        print("\naccuracy (%) of every method on the combinations the baselines ran on:\n" + ptable)
        write_table(out / "same_combinations", ptable, paired)
    plot_results(summary, out, f"{cfg.name}: {', '.join(tasks)}", paired)
    pools = {"both": pool, **{k: Pool.open(v, cfg.name, device) for k, v in ablation.items()}}
    cross = cross_expert_rows(pools, poe, tasks, a.n, test)
    ctable = markdown_table(cross, [(k, k) for k in cross[0]])
    print("\n" + ctable)
    write_table(out / "cross_expert_errors", ctable, cross)
    print(f"\nwrote {out}/composite_tasks.{{md,csv}}, composite_tasks_all.csv, cross_expert_errors.{{md,csv}}, "
          f"{'same_combinations.{md,csv}, ' if paired else ''}accuracy_vs_n.png, accuracy_vs_time.png")  # fmt: skip
    return 0


def main_experiments(argv: Sequence[str] | None = None) -> int:
    return run_main(experiments_body, experiments_parser(), argv)
