"""What every command line shares: the parser and its one-line errors, range-checked numbers, the device,
the common flags, running a body with its errors as exit codes, and opening the pool a command names."""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from PoE.core.choices import PRECISIONS
from PoE.core.datasets import DATASETS, DatasetConfig
from PoE.core.errors import PoEError
from PoE.core.paths import DATA_ROOT_HELP, default_data_root

if TYPE_CHECKING:
    import torch

    from PoE.core.runtime import Runtime
    from PoE.query.pool import Pool, PoolFolder


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
        return "\n".join(
            textwrap.fill(
                line,
                width,
                initial_indent=indent,
                subsequent_indent=hang,
                break_on_hyphens=False,
                break_long_words=False,
            )
            for line in lines
        )


def tasks_epilog(default_tasks: bool = False) -> str:
    """The primitive tasks of every built-in dataset (and, with ``default_tasks``, the defaults), for --help."""
    lines = []
    for name, cfg in DATASETS.items():
        if not cfg.tasks:  # a folder of images: its tasks come with it
            lines.append(f"{name} tasks: yours, from --hierarchy FILE (the pool keeps them)")
            continue
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
            show = (lambda x: f"{x:g}") if kind is float else str  # an integer bound in full: 4294967295
            rng = f"{'>=' if low_ok else '>'} {show(low)}" + (
                f" and {'<=' if high_ok else '<'} {show(high)}" if high is not None else ""
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
SEED = number(int, 0, high=2**32 - 1, high_ok=True)  # the seeds derived from it stay within torch's 64 bits


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
    p.add_argument(
        "--data_root",
        default=str(default_data_root()),
        help=f"folder holding <dataset>/ ({DATA_ROOT_HELP}"
        ": %(default)s; scripts/get_test_data.py fills it); with --dataset folder, the image folder "
        "itself",
    )
    p.add_argument("--db", default="DB_PoE", help="pool root; the pool is <db>/<dataset>/ (default: DB_PoE)")
    p.add_argument(
        "--hierarchy",
        default=None,
        metavar="FILE",
        help='the primitive tasks as a JSON file {"task": '
        '["class name", ...]} (default: the one the pool stores, else the dataset\'s built-in tasks); '
        "a pool keeps the hierarchy it was built with and refuses another",
    )
    p.add_argument(
        "--pool_digest",
        default=None,
        metavar="DIGEST",
        help="refuse any pool whose root digest (64 hex "
        "digits: Run_Service.py --list shows it) is not this one: the pool checked by its manifest is then "
        "also the one you meant",
    )
    p.add_argument(
        "--skip_bad_images",
        action="store_true",
        help="--dataset folder: skip unreadable images (each is named on stderr) instead of stopping at the first",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--precision",
        default=precision,
        choices=PRECISIONS,
        help="bf16: bfloat16 autocast (weights, "
        "optimizer state, BatchNorm statistics and losses stay fp32); auto: bf16 on a CUDA GPU or a CPU "
        "with native bf16 (AVX512-BF16, AMX), fp32 elsewhere; fp32 is IEEE fp32 on a GPU too (TF32 off), so "
        "it scores as on a CPU",
    )


def runtime_of(a: argparse.Namespace) -> Runtime:
    """The command's device and precision (``--device``, ``--precision``), resolved once and handed down."""
    from PoE.core.runtime import Runtime

    return Runtime.resolve(pick_device(a.device), a.precision)


def read_pool_folder(a: argparse.Namespace, missing_ok: bool = False) -> PoolFolder:
    """The pool folder at ``--db``, read once per command: its manifest, and the dataset with its tasks (checked
    against --hierarchy, the digest against --pool_digest). ``missing_ok``: no pool there is not an error yet (the
    tasks are the dataset's); opening it is."""
    from PoE.query.pool import PoolFolder

    return PoolFolder.read(a.db, a.dataset, a.hierarchy, a.skip_bad_images, a.pool_digest, missing_ok)


def open_pool(folder: PoolFolder, runtime: Runtime) -> Pool:
    """The pool's parts, read from the folder the command read."""
    from PoE.query.pool import Pool

    return Pool.load(folder, runtime)


MAX_COMBINATIONS = 5000  # combinations of tasks one command scores unless --max_combinations says more


def combinations_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max_combinations",
        type=POSITIVE_INT,
        default=MAX_COMBINATIONS,
        help="refuse to start when --tasks and --n make more combinations than this (each one is scored; "
        "docs/commands.md has the time per combination)",
    )


def check_combinations(tasks: list[str], ns: list[int], limit: int) -> int:
    """The number of combinations of n of ``tasks`` over ``ns``; above ``limit`` a one-line refusal that says how
    many and how to ask for fewer, before anything is loaded (20 tasks at n = 10 are 184,756 combinations)."""
    counts = {n: math.comb(len(tasks), n) for n in ns}
    total = sum(counts.values())
    if total > limit:
        fits = [n for n in range(1, len(tasks) + 1) if math.comb(len(tasks), n) <= limit]
        hint = f"e.g. --n {' '.join(map(str, fits[:3]))}" if fits else "fewer --tasks"
        shown = ", ".join(f"{counts[n]:,} at n = {n}" for n in sorted(counts))
        raise PoEError(
            f"{len(tasks)} tasks make {total:,} combinations ({shown}), over the limit of {limit:,}: give fewer "
            f"--tasks or other --n ({hint}), or raise --max_combinations"
        )
    return total


def chosen_tasks(a: argparse.Namespace, cfg: DatasetConfig) -> list[str]:
    """The tasks to combine (``--tasks``, default: the dataset's default tasks), checked against ``cfg``'s."""
    from PoE.core.query import make_query

    tasks = a.tasks or cfg.default_tasks
    make_query(tasks, cfg.tasks, cfg.name)
    return tasks
