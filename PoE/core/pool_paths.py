"""The pool folder's layout: ``library_<tag>.pt``, ``experts/expert_<task>.pt`` (the original code's names),
``manifest.json`` and ``hierarchy.json`` when this project made it; the rule for a task name, which names an
expert's file. Every path of a part is made here and confined to the pool folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from PoE.core.errors import PoEError
from PoE.core.jsonfile import read_json

MANIFEST_FILE = "manifest.json"
HIERARCHY_FILE = "hierarchy.json"  # in the pool's folder: the readable copy of the hierarchy its manifest records
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # it names a file (expert_<task>.pt) and a CLI word
TASK_RULE = "1-100 letters, digits, '_', '-' or '.', starting with a letter or digit (it names the expert's file)"


def valid_task_name(task: object) -> bool:
    """Whether ``task`` can name an expert's file: no separator, no ``..``, nothing but a plain word."""
    return isinstance(task, str) and TASK_NAME.fullmatch(task) is not None and ".." not in task


class PoolPaths:
    """Where the parts of one dataset's pool live. Every path of a part is made here, from a checked task name, and
    confined to the pool folder: what a command writes or deletes is always inside it."""

    def __init__(self, root: str | Path, tag: str) -> None:
        self.root = Path(root)
        self.tag = tag
        # the table of contents a server stats on every request (``manifest.signature``), as strings made once
        self.watched = (os.fspath(self.root / MANIFEST_FILE), os.fspath(self.root / HIERARCHY_FILE))

    @property
    def library(self) -> Path:
        return self.root / f"library_{self.tag}.pt"

    def expert(self, task: str) -> Path:
        """``experts/expert_<task>.pt``; a name that is not a plain task name, or a path that resolves outside
        the pool folder (a symlinked ``experts/``), is refused before anything touches it."""
        if not valid_task_name(task):
            raise PoEError(f"{task!r} is not a task name: use {TASK_RULE}")
        path = self.root / "experts" / f"expert_{task}.pt"
        try:
            root, real = self.root.resolve(), path.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise PoEError(f"cannot resolve {path}: {e}") from None
        if real.parent != root / "experts":
            raise PoEError(
                f"{path} resolves to {real}, outside the pool's experts/ folder {root / 'experts'}; a "
                "pool's files live in its own folder"
            )
        return path

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    def experts_present(self) -> list[str]:
        d = self.root / "experts"
        names = (p.name[len("expert_") : -3] for p in d.glob("expert_*.pt")) if d.is_dir() else ()
        return sorted(t for t in names if valid_task_name(t))  # another name cannot be a task's: not an expert

    def read_manifest(self) -> dict[str, Any]:
        if not os.path.lexists(self.manifest):
            return {}
        manifest = read_json(self.manifest)  # a FIFO or a dangling link in its place is one line
        if not isinstance(manifest, dict):
            raise PoEError(f"{self.manifest} is not valid: it holds a {type(manifest).__name__}, not a JSON object")
        return manifest


def resolve_pool(db: str | Path, dataset: str, tag: str) -> PoolPaths:
    """``db`` may be the pool folder itself (e.g. the original release) or hold ``<dataset>/``."""
    db = Path(db)
    for root in (db, db / dataset):
        if (root / f"library_{tag}.pt").is_file():
            return PoolPaths(root, tag)
    raise PoEError(
        f"no {dataset} pool at {db}: expected {db / dataset / f'library_{tag}.pt'}; "
        f"create it with: python Run_preprocessing.py --dataset {dataset} --db {db}"
    )
