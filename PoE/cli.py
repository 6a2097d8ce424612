"""Command lines of the entry scripts. ``main_*(argv)`` returns an exit code; errors are one line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from PoE.errors import PoEError


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PoEError(f"unknown device {name!r}; use cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PoEError("--device cuda asked for, but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise PoEError(f"unsupported device {name!r}; use cpu, cuda or cuda:<index>")
    return dev


def run_main(body: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser, argv: Sequence[str] | None):
    args = parser.parse_args(argv)
    try:
        return body(args)
    except PoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar100", help="cifar100 (default), tinyimagenet or imagenet")
    p.add_argument("--data_root", default="data", help="folder holding <dataset>/ (default: data)")
    p.add_argument("--db", default="DB_PoE", help="pool root; the pool is <db>/<dataset>/ (default: DB_PoE)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")


# ---------------------------------------------------------------------------- preprocessing
def preprocessing_parser() -> argparse.ArgumentParser:
    from PoE.config import PROFILES
    from PoE.preprocess import STAGES

    p = argparse.ArgumentParser(
        prog="Run_preprocessing.py",
        description="Build the pool: train (or load) the Oracle, distill the library, extract one expert per "
        "primitive task by conditional KD. Finished stages are loaded; interrupted ones resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common_arguments(p)
    p.add_argument("--profile", default="paper", help="schedule preset: " + "; ".join(
        f"{k}: {v.description}" for k, v in PROFILES.items()))  # fmt: skip
    p.add_argument("--stages", nargs="+", default=list(STAGES), metavar="STAGE", help=f"stages to run: {STAGES}")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="primitive tasks (default: all)")
    p.add_argument("--retrain", nargs="*", default=[], metavar="STAGE", help="retrain these stages even if done")
    p.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle and library student")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--oracle_arch", default=None, help="Oracle network, e.g. wrn-40-4 (default: the profile's)")
    for stage in STAGES:
        g = p.add_argument_group(f"{stage} stage (default: the profile's)")
        name = stage.rstrip("s")
        g.add_argument(f"--{name}_epochs", type=int, default=None)
        g.add_argument(f"--{name}_lr", type=float, default=None)
        g.add_argument(f"--{name}_batch_size", type=int, default=None)
        g.add_argument(f"--{name}_schedule", default=None, help="step or onecycle")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every stage")
    p.add_argument("--batch_size", type=int, default=None, help="batch size of every stage")
    p.add_argument("--weight_decay", type=float, default=None, help="weight decay of every stage")
    p.add_argument("--label_smoothing", type=float, default=None, help="Oracle cross-entropy label smoothing")
    p.add_argument("--T", type=float, default=None, help="distillation temperature")
    p.add_argument("--alpha", type=float, default=None, help="weight of L_scale")
    p.add_argument("--loss", default="both", help="expert loss: both (L_soft + alpha L_scale), soft or scale")
    p.add_argument("--teacher_views", type=int, default=None, help="augmented views whose Oracle logits are "
                   "cached and cycled through (0: run the Oracle on every batch)")  # fmt: skip
    p.add_argument(
        "--train_limit", type=int, default=None, help="train on a random subset of this many images (smoke tests)"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise PoEError(f"--{name} must be positive, got {value}")


def preprocessing_settings(a: argparse.Namespace):
    from PoE.config import get_dataset, get_profile, override
    from PoE.networks import WRNSpec
    from PoE.preprocess import STAGES, Settings

    cfg = get_dataset(a.dataset)
    prof = get_profile(a.profile)
    for lst, what in ((a.stages, "--stages"), (a.retrain, "--retrain")):
        bad = [x for x in lst if x not in STAGES]
        if bad:
            raise PoEError(f"unknown stage {bad[0]!r} in {what}; known stages: {', '.join(STAGES)}")
    if not a.stages:
        raise PoEError(f"--stages needs at least one of: {', '.join(STAGES)}")
    tasks = list(cfg.tasks) if a.tasks is None else a.tasks
    from PoE.hierarchy import make_query

    make_query(tasks, cfg.tasks, cfg.name)  # validates names, duplicates, emptiness
    if a.loss not in ("both", "soft", "scale"):
        raise PoEError(f"unknown --loss {a.loss!r}; known: both, soft, scale")
    stages = {}
    for stage in STAGES:
        name = stage.rstrip("s")
        for key in ("epochs", "lr", "batch_size"):
            positive(f"{name}_{key}", getattr(a, f"{name}_{key}"))
        sched = getattr(a, f"{name}_schedule")
        if sched not in (None, "step", "onecycle"):
            raise PoEError(f"unknown --{name}_schedule {sched!r}; known: step, onecycle")
        stages[stage] = override(
            getattr(prof, stage),
            epochs=getattr(a, f"{name}_epochs") or a.epochs,
            lr=getattr(a, f"{name}_lr"),
            batch_size=getattr(a, f"{name}_batch_size") or a.batch_size,
            schedule=sched,
            weight_decay=a.weight_decay,
        )
    stages["oracle"] = override(stages["oracle"], label_smoothing=a.label_smoothing)
    positive("batch_size", a.batch_size)
    positive("epochs", a.epochs)
    positive("train_limit", a.train_limit)
    positive("T", a.T)
    oracle_arch = a.oracle_arch or prof.oracle_arch or cfg.oracle_arch
    try:
        WRNSpec.parse(oracle_arch)
    except ValueError as e:
        raise PoEError(f"--oracle_arch: {e}") from None
    views = prof.teacher_views if a.teacher_views is None else a.teacher_views
    if views < 0:
        raise PoEError(f"--teacher_views must be >= 0, got {views}")
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
        device=pick_device(a.device),
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
    )


def preprocessing_body(a: argparse.Namespace) -> int:
    from PoE.preprocess import Preprocessor

    s = preprocessing_settings(a)
    print(f"Pool of Experts preprocessing: {s.cfg.name}, profile {s.profile.name}, Oracle {s.oracle_arch}, "
          f"device {s.device}, stages {', '.join(s.stages)}")  # fmt: skip
    report = Preprocessor(s).run()
    print()
    print(report.table())
    info = report.info
    print(f"\nwall time of this run: {info['wall_seconds']:.0f}s; teacher logits computed: "
          f"{info['teacher_cache_seconds']:.0f}s; pool: {s.db / s.cfg.name}")  # fmt: skip
    return 0


def main_preprocessing(argv: Sequence[str] | None = None) -> int:
    return run_main(preprocessing_body, preprocessing_parser(), argv)


# ---------------------------------------------------------------------------- service
def service_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="Run_Service.py",
        description="Answer a query (a set of primitive tasks) in real time: consolidate the shared library and "
        "the queried experts into one task-specific model, without training, and report its accuracy and cost.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    common_arguments(p)
    p.add_argument("--queriedTask", nargs="*", default=None, metavar="TASK", help="primitive tasks of the query")
    p.add_argument("--list", action="store_true", help="list the pool's tasks and their classes, then exit")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object (last line)")
    p.add_argument("--export", default=None, metavar="PATH", help="write the built model with torch.export (.pt2)")
    p.add_argument("--no_eval", action="store_true", help="build (and export) only; skip the test-set accuracy")
    return p


def human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def list_pool(cfg, db: str) -> int:
    from PoE.store import resolve_pool

    pool = resolve_pool(db, cfg.name, cfg.tag)
    have = set(pool.experts_present())
    manifest = pool.read_manifest().get("experts", {})
    print(f"pool {pool.root} ({cfg.name}): {len(have)} of {len(cfg.tasks)} experts present")
    width = max(len(t) for t in cfg.tasks)
    for task, classes in cfg.tasks.items():
        acc = manifest.get(task, {}).get("test_acc")
        mark = "yes" if task in have else "no "
        extra = f"  expert acc {acc:.2f}%" if acc is not None else ""
        print(f"  {task.ljust(width)}  in pool: {mark}  classes {classes}{extra}")
    return 0


def export_model(model: torch.nn.Module, cfg, path: str) -> None:
    from PoE.consolidate import RawInput
    from PoE.store import atomic_write

    target = Path(path)
    if target.is_dir():
        raise PoEError(f"--export {path} is a folder; give a file name such as model.pt2")
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise PoEError(f"cannot export to {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise PoEError(f"cannot export to {path}: folder {parent} is not writable")
    wrapped = RawInput(model, cfg.mean, cfg.std).eval()
    device = next(model.parameters()).device
    example = torch.rand(2, 3, cfg.image_size, cfg.image_size, device=device)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    program = torch.export.export(wrapped, (example,), dynamic_shapes=({0: batch},))
    atomic_write(target, lambda f: torch.export.save(program, f))


def service_body(a: argparse.Namespace) -> int:
    from PoE.config import get_dataset
    from PoE.consolidate import build_from_pool
    from PoE.data import Normalizer, load_split
    from PoE.evaluate import accuracy, count_macs, count_params
    from PoE.hierarchy import make_query
    from PoE.store import resolve_pool

    cfg = get_dataset(a.dataset)
    if a.list:
        return list_pool(cfg, a.db)
    if a.queriedTask is None:
        raise PoEError(f"name the query with --queriedTask TASK [TASK ...]; known tasks: {', '.join(cfg.tasks)}")
    query = make_query(a.queriedTask, cfg.tasks, cfg.name)
    device = pick_device(a.device)
    pool = resolve_pool(a.db, cfg.name, cfg.tag)
    built = build_from_pool(pool, cfg, query, device)
    model = built.model
    shape = (3, cfg.image_size, cfg.image_size)
    result = {
        "tasks": list(query.tasks),
        "accuracy": None,
        "n_test": 0,
        "flops": count_macs(model, shape, device),
        "params": count_params(model),
        "build_ms": round(built.build_ms, 2),
        "load_ms": round(built.load_ms, 2),
        "assemble_ms": round(built.assemble_ms, 2),
        "classes": query.classes,
        "pool": str(pool.root),
    }
    if not a.no_eval:
        test = load_split(cfg.name, a.data_root, "test")
        acc, n = accuracy(model, test, query.classes, Normalizer(cfg.mean, cfg.std, device), device)
        result["accuracy"], result["n_test"] = round(acc, 2), n
    if a.export:
        export_model(model, cfg, a.export)
    rows = [
        ("dataset / pool", f"{cfg.name} / {pool.root}"),
        ("query", f"{', '.join(query.tasks)} ({query.num_classes} classes)"),
        (
            "accuracy",
            "not evaluated (--no_eval)"
            if a.no_eval
            else f"{result['accuracy']:.2f}% on {result['n_test']} test images of the query's classes",
        ),
        ("FLOPs", f"{human(result['flops'])} multiply-adds per image (conv + linear)"),
        ("parameters", f"{human(result['params'])} ({result['params']:,})"),
        (
            "build time",
            f"{built.build_ms:.1f} ms (read checkpoints {built.load_ms:.1f} ms + consolidate "
            f"{built.assemble_ms:.1f} ms; no training)",
        ),
    ]
    if a.export:
        rows.append(("exported", a.export))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    if a.json:
        print(json.dumps(result))
    return 0


def main_service(argv: Sequence[str] | None = None) -> int:
    return run_main(service_body, service_parser(), argv)
