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
from PoE.precision import PRECISIONS


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something (not None, not already in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        empty = action.default is None or action.default is False or action.default == []
        if empty or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return super()._get_help_string(action)


def pick_device(name: str | None) -> torch.device:
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
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return body(args)
    except PoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # output piped into e.g. head
        return 0
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="cifar100", help="dataset of the pool")
    p.add_argument("--data_root", default="data", help="folder holding <dataset>/ (default: data)")
    p.add_argument("--db", default="DB_PoE", help="pool root; the pool is <db>/<dataset>/ (default: DB_PoE)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="bf16: bfloat16 autocast (weights, "
                   "optimizer state, BatchNorm statistics and losses stay fp32); auto: bf16 on a CUDA GPU or a CPU "
                   "with native bf16 (AVX512-BF16, AMX), fp32 elsewhere")  # fmt: skip


# ---------------------------------------------------------------------------- preprocessing
def preprocessing_parser() -> argparse.ArgumentParser:
    from PoE.config import PROFILES
    from PoE.preprocess import STAGES

    p = argparse.ArgumentParser(
        prog="Run_preprocessing.py",
        description="Build the pool: train (or load) the Oracle, distill the library, extract one expert per "
        "primitive task by conditional KD. Finished stages are loaded; interrupted ones resume.",
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--profile", default="paper", help="schedule preset: " + "; ".join(
        f"{k}: {v.description}" for k, v in PROFILES.items()))  # fmt: skip
    p.add_argument(
        "--stages", nargs="+", default=list(STAGES), metavar="STAGE", help=f"stages to run, of {', '.join(STAGES)}"
    )
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="primitive tasks (default: all)")
    p.add_argument("--retrain", nargs="*", default=[], metavar="STAGE", help="retrain these stages even if done")
    p.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle and library student")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, batch order and augmented views")
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
    p.add_argument("--compile", nargs="+", default=["auto"], choices=("auto", "on", "off", *STAGES),
                   metavar="WHICH", help="torch.compile the training steps of these stages (on: all, off: none; "
                   "auto: the profile's, on CUDA only)")  # fmt: skip
    g = p.add_argument_group("pretrained Oracle and library (ImageNet)")
    g.add_argument("--oracle_weights", default=None, help="the Oracle's state dict file (default: torchvision's "
                   "ImageNet weights in the torch hub cache)")  # fmt: skip
    g.add_argument("--library_weights", default=None, help="a whole MobileNetV2 state dict file whose features[:18] "
                   "become the library (default: torchvision's ImageNet weights in the torch hub cache)")  # fmt: skip
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers decoding images (default: one "
                   "per core, at most 8)")  # fmt: skip
    return p


def positive(name: str, value: float | None) -> None:
    if value is not None and value <= 0:
        raise PoEError(f"--{name} must be positive, got {value}")


def preprocessing_settings(a: argparse.Namespace):
    from PoE.config import for_dataset, get_dataset, get_profile, override
    from PoE.networks import check_arch
    from PoE.precision import resolve as resolve_precision
    from PoE.preprocess import STAGES, Settings

    cfg = get_dataset(a.dataset)
    prof = for_dataset(get_profile(a.profile), cfg)
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
        check_arch(oracle_arch, cfg)
    except ValueError as e:
        raise PoEError(f"--oracle_arch: {e}") from None
    views = prof.teacher_views if a.teacher_views is None else a.teacher_views
    if cfg.pretrained and views:
        raise PoEError(f"--teacher_views must be 0 for {cfg.name}: its images are streamed, the Oracle sees each batch")
    if a.workers is not None and a.workers < 0:
        raise PoEError(f"--workers must be >= 0, got {a.workers}")
    if views < 0:
        raise PoEError(f"--teacher_views must be >= 0, got {views}")
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
    )


def preprocessing_body(a: argparse.Namespace) -> int:
    from PoE import distributed
    from PoE.precision import describe
    from PoE.preprocess import Preprocessor

    s = preprocessing_settings(a)
    s.device = distributed.setup(s.device)  # under torchrun: join the process group, one GPU per process
    main, procs = distributed.is_main(), distributed.world()
    try:
        if main:
            print(f"Pool of Experts preprocessing: {s.cfg.name}, profile {s.profile.name}, Oracle {s.oracle_arch}, "
                  f"device {s.device}{f' x {procs} processes' if procs > 1 else ''}, "
                  f"stages {', '.join(s.stages)}; {describe(s.precision, a.precision, s.device)}"
                  f"{'; torch.compile: ' + ', '.join(s.compile) if s.compile else ''}")  # fmt: skip
        report = Preprocessor(s).run()
    finally:
        distributed.destroy()
    if not main:  # rank 0 reports
        return 0
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
        formatter_class=Help,
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
        test = load_split(cfg.name, a.data_root, "test", classes=query.classes)
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


# ---------------------------------------------------------------------------- evaluation over combinations
def evaluation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="Run_Evaluation.py",
        description="Score a pool's train-free consolidated models over every combination of n of a list of "
        "tasks and print, per n, the mean +- std accuracy (over combinations), the share of errors that are "
        "cross-expert errors, and the models' multiply-adds and parameters.",
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="tasks to combine (default: the "
                   "dataset's six default tasks)")  # fmt: skip
    p.add_argument("--n", nargs="+", type=int, default=None, help="combination sizes (default: 2 .. len(tasks)-1)")
    p.add_argument("--out", default=None, help="also write <out>.md and <out>.csv (per n) and <out>_all.csv")
    p.add_argument("--json", action="store_true", help="also print the per-n rows as one JSON list (last line)")
    return p


SUMMARY_COLUMNS = [
    ("n", "n"),
    ("combinations", "combinations"),
    ("acc_mean", "accuracy mean (%)"),
    ("acc_std", "std"),
    ("acc_min", "min"),
    ("acc_max", "max"),
    ("cross_expert_error_share", "cross-expert errors / errors (%)"),
    ("macs", "multiply-adds"),
    ("params", "parameters"),
]


def evaluation_body(a: argparse.Namespace) -> int:
    from PoE.config import get_dataset
    from PoE.data import load_split
    from PoE.experiments import markdown_table, pool_combinations, summarize, write_csv, write_text
    from PoE.hierarchy import make_query
    from PoE.store import resolve_pool

    cfg = get_dataset(a.dataset)
    tasks = a.tasks or cfg.default_tasks
    make_query(tasks, cfg.tasks, cfg.name)
    ns = a.n or list(range(2, len(tasks)))
    bad = [n for n in ns if not 1 <= n <= len(tasks)]
    if bad or not ns:
        raise PoEError(f"--n must be between 1 and the number of tasks ({len(tasks)}), got {bad or ns}")
    device = pick_device(a.device)
    pool = resolve_pool(a.db, cfg.name, cfg.tag)
    test = load_split(cfg.name, a.data_root, "test", classes=make_query(tasks, cfg.tasks).classes)
    results = pool_combinations(pool, cfg, tasks, ns, test, device)
    rows = summarize(results)
    for r in rows:
        r["macs"], r["params"] = round(r["macs"]), round(r["params"])
    print(f"pool {pool.root}: {cfg.name}, tasks {', '.join(tasks)}")
    print("accuracy: over each composite task's test images; mean and population std over combinations\n")
    table = markdown_table(rows, SUMMARY_COLUMNS)
    print(table)
    if a.out:
        write_text(f"{a.out}.md", table + "\n")
        write_csv(f"{a.out}.csv", rows)
        per_combo = [{"n": len(r.tasks), "tasks": " ".join(r.tasks), "accuracy": r.accuracy, "n_test": r.n_test,
                      "cross_expert_errors": r.cross_errors, "errors": r.errors, "macs": r.macs,
                      "params": r.params} for r in results]  # fmt: skip
        write_csv(f"{a.out}_all.csv", per_combo)
        print(f"\nwrote {a.out}.md, {a.out}.csv, {a.out}_all.csv")
    if a.json:
        print(json.dumps(rows))
    return 0


def main_evaluation(argv: Sequence[str] | None = None) -> int:
    return run_main(evaluation_body, evaluation_parser(), argv)


# ---------------------------------------------------------------------------- baselines
def baselines_parser() -> argparse.ArgumentParser:
    from PoE.baselines import METHODS

    p = argparse.ArgumentParser(
        prog="Run_Baselines.py",
        description="Train the paper's baselines for a query and print them beside PoE's train-free model: "
        "accuracy on the composite task, multiply-adds, parameters and the wall time to produce each model.",
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--queriedTask", nargs="+", required=True, metavar="TASK", help="primitive tasks of the query")
    p.add_argument("--method", nargs="+", default=list(METHODS), metavar="METHOD", help=f"of {METHODS}")
    p.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle (for ckd)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every method (default: the paper's: 200 "
                   "for scratch, sd, uhc; 100 for transfer, ckd)")  # fmt: skip
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--schedule", default="step", help="step (x0.1 at 40%% and 80%%) or onecycle")
    p.add_argument("--T", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON list (last line)")
    p.add_argument("--no_progress", action="store_true")
    return p


def load_oracle(pretrained: str | Path, cfg, device: torch.device) -> torch.nn.Module:
    from PoE.networks import build_network
    from PoE.store import load_checkpoint, load_into, unwrap

    path = Path(pretrained) / cfg.name / "oracle.pt"
    hint = f"make it with: python Run_preprocessing.py --dataset {cfg.name} --stages oracle"
    sd, meta = unwrap(load_checkpoint(path, hint), path, "oracle")
    arch = str(meta.get("arch"))
    model = load_into(build_network(arch, cfg), sd, path, f"{arch} Oracle")
    return model.to(device).to(memory_format=torch.channels_last).eval()


def check_baseline_flags(a: argparse.Namespace) -> None:
    for name in ("epochs", "lr", "batch_size"):
        positive(name, getattr(a, name))
    if a.schedule not in ("step", "onecycle"):
        raise PoEError(f"unknown --schedule {a.schedule!r}; known: step, onecycle")


def baseline_runner(a: argparse.Namespace, cfg, device: torch.device, train, test, method: str, T: float = 4.0,
                    alpha: float = 0.3):  # fmt: skip
    """A BaselineRunner for ``method`` with the command line's schedule (paper epochs unless --epochs)."""
    from PoE.baselines import BaselineRunner
    from PoE.config import StageConfig
    from PoE.consolidate import load_expert, load_library
    from PoE.store import resolve_pool

    parts: dict[str, torch.nn.Module] = {}

    def pool_part(task: str | None) -> torch.nn.Module:  # PoE's library / an expert, loaded on first use
        pool = resolve_pool(a.db, cfg.name, cfg.tag)
        if "library" not in parts:
            parts["library"] = load_library(pool, cfg)
        lib = parts["library"]
        return lib if task is None else load_expert(pool, cfg, task, lib.out_channels)

    epochs = a.epochs or (100 if method in ("transfer", "ckd") else 200)
    stage = StageConfig(epochs=epochs, lr=a.lr, batch_size=a.batch_size, schedule=a.schedule)
    return BaselineRunner(cfg, train, test, device, stage, T, alpha, a.seed,
                          oracle=lambda: load_oracle(a.pretrained, cfg, device), pool_part=pool_part,
                          teacher_dir=Path(a.pretrained) / cfg.name / "baselines",
                          progress=not a.no_progress)  # fmt: skip


def baselines_body(a: argparse.Namespace) -> int:
    from dataclasses import asdict

    from PoE.baselines import METHODS
    from PoE.config import get_dataset
    from PoE.consolidate import build_from_pool
    from PoE.data import Normalizer, load_split
    from PoE.evaluate import accuracy, count_macs, count_params
    from PoE.hierarchy import make_query
    from PoE.store import resolve_pool

    cfg = get_dataset(a.dataset)
    query = make_query(a.queriedTask, cfg.tasks, cfg.name)
    bad = [m for m in a.method if m not in METHODS]
    if bad:
        raise PoEError(f"unknown method {bad[0]!r}; known methods: {', '.join(METHODS)}")
    check_baseline_flags(a)
    positive("T", a.T)
    device = pick_device(a.device)
    train = load_split(cfg.name, a.data_root, "train")
    test = load_split(cfg.name, a.data_root, "test")
    rows = []
    for method in a.method:
        r = baseline_runner(a, cfg, device, train, test, method, a.T, a.alpha).run(method, list(query.tasks))
        rows.append({k: v for k, v in asdict(r).items() if k != "extra"})
    try:
        pool = resolve_pool(a.db, cfg.name, cfg.tag)
        built = build_from_pool(pool, cfg, query, device)
        acc, n = accuracy(built.model, test, query.classes, Normalizer(cfg.mean, cfg.std, device), device)
        shape = (3, cfg.image_size, cfg.image_size)
        rows.append({"method": "poe", "tasks": list(query.tasks), "accuracy": acc, "n_test": n,
                     "macs": count_macs(built.model, shape, device), "params": count_params(built.model),
                     "seconds": built.build_ms / 1e3, "teacher_seconds": 0.0, "epochs": 0})  # fmt: skip
    except PoEError as e:
        print(f"(no PoE row: {e})")
    cols = [("method", "method"), ("accuracy", "accuracy (%)"), ("n_test", "test images"), ("macs", "multiply-adds"),
            ("params", "parameters"), ("epochs", "epochs"), ("seconds", "time to produce (s)"),
            ("teacher_seconds", "+ teachers (s)")]  # fmt: skip
    from PoE.experiments import markdown_table

    print(f"query: {', '.join(query.tasks)} ({query.num_classes} classes); device {device}")
    print(markdown_table(rows, cols))
    if a.json:
        print(json.dumps(rows))
    return 0


def main_baselines(argv: Sequence[str] | None = None) -> int:
    return run_main(baselines_body, baselines_parser(), argv)


# ---------------------------------------------------------------------------- the paper's tables
def experiments_parser() -> argparse.ArgumentParser:
    from PoE.baselines import METHODS

    p = argparse.ArgumentParser(
        prog="Run_Experiments.py",
        description="The paper's comparisons: for n tasks out of a list, the Oracle (restricted to the composite's "
        "classes), PoE and the training-based baselines: accuracy (mean +- std over combinations), multiply-adds, "
        "parameters and time per query; and the cross-expert error share of pools extracted with L_soft only, "
        "L_scale only and both. Writes Markdown and CSV tables and PNG plots.",
        formatter_class=Help,
    )
    common_arguments(p)
    p.add_argument("--pretrained", default="DB_pretrained", help="folder of the Oracle")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="default: the dataset's six")
    p.add_argument("--n", nargs="+", type=int, default=[2, 3, 4, 5])
    p.add_argument("--methods", nargs="+", default=["oracle", "poe", *METHODS], metavar="METHOD")
    p.add_argument("--combos_per_n", type=int, default=2, help="baselines: a fixed seeded sample of this many "
                   "combinations per n (0: all); the Oracle and PoE are always scored on all")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="baseline epochs (default: the paper's 200 / 100)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument("--schedule", default="step", help="step or onecycle")
    p.add_argument("--ablation", nargs="*", default=[], metavar="NAME=DB", help="pools for the cross-expert "
                   "table, e.g. soft=DB_soft scale=DB_scale (the --db pool is 'both')")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="addImg", help="folder for the tables and plots")
    p.add_argument("--no_progress", action="store_true")
    return p


def experiments_body(a: argparse.Namespace) -> int:
    from PoE.baselines import METHODS
    from PoE.config import get_dataset
    from PoE.consolidate import build_from_pool
    from PoE.data import load_split
    from PoE.experiments import (
        METHOD_ORDER,
        markdown_table,
        oracle_combinations,
        plot_results,
        pool_combinations,
        sample_combinations,
        summarize,
        summarize_methods,
        write_csv,
        write_text,
    )
    from PoE.hierarchy import make_query
    from PoE.store import resolve_pool

    cfg = get_dataset(a.dataset)
    tasks = a.tasks or cfg.default_tasks
    make_query(tasks, cfg.tasks, cfg.name)
    bad = [m for m in a.methods if m not in METHOD_ORDER]
    if bad:
        raise PoEError(f"unknown method {bad[0]!r}; known: {', '.join(METHOD_ORDER)}")
    if not a.n or any(not 1 <= n <= len(tasks) for n in a.n):
        raise PoEError(f"--n must be between 1 and the number of tasks ({len(tasks)}), got {a.n}")
    ablation = {}
    for item in a.ablation:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise PoEError(f"--ablation takes NAME=DB pairs (e.g. soft=DB_soft), got {item!r}")
        ablation[name] = path
    check_baseline_flags(a)
    device = pick_device(a.device)
    pool = resolve_pool(a.db, cfg.name, cfg.tag)
    test = load_split(cfg.name, a.data_root, "test")
    out = Path(a.out)
    all_combos = {n: sample_combinations(tasks, n, 0) for n in a.n}
    rows: list[dict] = []
    if "oracle" in a.methods:
        oracle = load_oracle(a.pretrained, cfg, device)
        rows += oracle_combinations(oracle, cfg, [c for n in a.n for c in all_combos[n]], test, device)
    poe = pool_combinations(pool, cfg, tasks, a.n, test, device)
    if "poe" in a.methods:
        for r in poe:
            built = build_from_pool(pool, cfg, make_query(r.tasks, cfg.tasks), device)
            rows.append({"method": "poe", "n": len(r.tasks), "tasks": " ".join(r.tasks), "accuracy": r.accuracy,
                         "n_test": r.n_test, "macs": r.macs, "params": r.params,
                         "seconds": built.build_ms / 1e3})  # fmt: skip
    methods = [m for m in a.methods if m in METHODS]
    schedule_note = ""
    if methods:
        train = load_split(cfg.name, a.data_root, "train")
        for method in methods:
            runner = baseline_runner(a, cfg, device, train, test, method)
            for n in a.n:
                for combo in sample_combinations(tasks, n, a.combos_per_n, a.seed):
                    r = runner.run(method, list(combo))
                    rows.append({"method": method, "n": n, "tasks": " ".join(combo), "accuracy": r.accuracy,
                                 "n_test": r.n_test, "macs": r.macs, "params": r.params, "seconds": r.seconds,
                                 "teacher_seconds": r.teacher_seconds})  # fmt: skip
        schedule_note = (
            f"baselines: {a.combos_per_n or 'all'} combination(s) per n (seed {a.seed}), SGD lr {a.lr}, batch "
            f"{a.batch_size}, {a.schedule} schedule, {a.epochs or 'paper'} epochs; "
        )
    summary = summarize_methods(rows)
    cols = [("method", "method"), ("n", "n"), ("combinations", "combinations"), ("acc_mean", "accuracy (%)"),
            ("acc_std", "std"), ("macs", "multiply-adds"), ("params", "parameters"),
            ("seconds_per_query", "time per query (s)")]  # fmt: skip
    note = (f"{cfg.name}, pool {pool.root}, tasks {', '.join(tasks)}, device {device}. {schedule_note}"
            "Oracle and PoE: every combination. PoE time = reading + consolidating (no training).")  # fmt: skip
    table = markdown_table(summary, cols)
    print(note + "\n\n" + table)
    write_text(out / "composite_tasks.md", note + "\n\n" + table + "\n")
    write_csv(out / "composite_tasks.csv", summary)
    write_csv(out / "composite_tasks_all.csv", rows)
    plot_results(summary, out, f"{cfg.name}: {', '.join(tasks)}")
    variants = {"both": pool, **{k: resolve_pool(v, cfg.name, cfg.tag) for k, v in ablation.items()}}
    cross_rows = []
    for name, p in variants.items():
        results = poe if name == "both" else pool_combinations(p, cfg, tasks, a.n, test, device)
        for r in summarize(results):
            cross_rows.append({"experts trained with": name, "n": r["n"], "accuracy": r["acc_mean"],
                               "cross-expert errors / errors (%)": r["cross_expert_error_share"]})  # fmt: skip
    ctable = markdown_table(cross_rows, [(k, k) for k in cross_rows[0]])
    print("\n" + ctable)
    write_text(out / "cross_expert_errors.md", ctable + "\n")
    write_csv(out / "cross_expert_errors.csv", cross_rows)
    print(f"\nwrote {out}/composite_tasks.{{md,csv}}, composite_tasks_all.csv, cross_expert_errors.{{md,csv}}, "
          "accuracy_vs_n.png, accuracy_vs_time.png")  # fmt: skip
    return 0


def main_experiments(argv: Sequence[str] | None = None) -> int:
    return run_main(experiments_body, experiments_parser(), argv)
