"""Task hierarchies: which classes each primitive task holds, from a JSON file or the dataset's built-in table.

A hierarchy file is ``{"task name": ["class name", ...], ...}``: disjoint, non-empty sets of the dataset's
classes (they need not cover all of them). A pool stores the hierarchy its experts were built with as
``hierarchy.json`` in its folder (with its id, a hash of its content); every later command reads it from there,
and a different ``--hierarchy`` is refused. A pool without that file (the shipped pool, the original release)
uses the dataset's built-in tasks. The library and the Oracle do not depend on the tasks: a new hierarchy over
a dataset reuses them and trains only its experts. The pool's manifest records the hierarchy too (it is what a
pool's tasks are read from; ``hierarchy.json`` is its readable copy, checked against it): one manifest write commits
an added or removed task with its expert (``PoE.build.edit``).

The table flows as a value: ``Hierarchy.apply(cfg)`` is the ``DatasetConfig`` whose ``tasks`` are the
hierarchy's, and every stage, the pool and the service read ``cfg.tasks`` of the config they were given.

A hierarchy is made by ``Hierarchy``'s constructors (``builtin_of``, ``of``, ``parse``, ``read``, ``given``); a pool's
is read by the five functions below, each named for what it returns: ``recorded_hierarchy`` (the pool's, as its
manifest records it), ``pool_hierarchy`` (that one checked against the one a user gives), ``hierarchy_to_build`` (what
a preprocessing run into a folder builds), ``copy_notes`` (what is wrong with ``hierarchy.json``, the readable copy)
and ``write_copy``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PoE.core.datasets import DatasetConfig, class_index
from PoE.core.errors import PoEError
from PoE.core.jsonfile import read_json
from PoE.core.manifest import Contents, valid_record
from PoE.core.store import HIERARCHY_FILE, TASK_RULE, PoolPaths, save_json, valid_task_name

DEFAULT_QUERY_TASKS = 6  # a file's first six tasks are what Run_Evaluation combines by default (as the paper's six)
SHAPE = '{"task name": ["class name", ...], ...}'


@dataclass(frozen=True)
class Hierarchy:
    """The primitive tasks of a pool: task -> class ids (ascending), in the file's task order."""

    dataset: str
    tasks: dict[str, list[int]]
    source: str  # the file it was read from, or "the built-in tasks of <dataset>"
    builtin: bool = False

    @classmethod
    def builtin_of(cls, cfg: DatasetConfig) -> Hierarchy:
        """The dataset's built-in tasks."""
        tasks = {t: sorted(c) for t, c in cfg.tasks.items()}
        return cls(cfg.name, tasks, f"the built-in tasks of {cfg.name}", builtin=True)

    @classmethod
    def of(cls, cfg: DatasetConfig, tasks: Mapping[str, list[int]] | None = None, source: str = "") -> Hierarchy:
        """The hierarchy of ``tasks`` (default: ``cfg``'s): the built-in one when they are the dataset's own."""
        h = cls(cfg.name, {t: sorted(c) for t, c in (cfg.tasks if tasks is None else tasks).items()}, source)
        builtin = cls.builtin_of(cfg)
        return builtin if h.id == builtin.id else h

    @classmethod
    def parse(cls, obj: Any, cfg: DatasetConfig, source: str) -> Hierarchy:
        """A decoded hierarchy checked against ``cfg``'s classes; every error is one line naming what is wrong."""
        if (
            isinstance(obj, Mapping)
            and isinstance(obj.get("tasks"), Mapping)
            and set(obj) <= {"dataset", "id", "tasks"}
        ):
            if obj.get("dataset", cfg.name) != cfg.name:  # a pool's stored hierarchy.json, given back
                raise PoEError(f"hierarchy {source}: it is a hierarchy of {obj.get('dataset')}, not of {cfg.name}")
            obj = obj["tasks"]
        if not isinstance(obj, Mapping):
            raise PoEError(f"hierarchy {source}: expected a JSON object {SHAPE}, got {_json_type(obj)}")
        if not obj:
            raise PoEError(f"hierarchy {source}: it names no task; expected {SHAPE}")
        index = class_index(cfg)
        owner: dict[int, str] = {}
        tasks: dict[str, list[int]] = {}
        for task, names in obj.items():
            if not valid_task_name(task):
                raise PoEError(f"hierarchy {source}: task name {task!r} is not accepted: use {TASK_RULE}")
            if not isinstance(names, list):
                raise PoEError(
                    f"hierarchy {source}: task {task!r} must be a list of class names, got {_json_type(names)}"
                )
            if not names:
                raise PoEError(f"hierarchy {source}: task {task!r} is empty; give it at least one class")
            tasks[task] = sorted(_class_ids(task, names, index, owner, cfg, source))
        return cls(cfg.name, tasks, source)

    @classmethod
    def read(cls, path: str | Path, cfg: DatasetConfig) -> Hierarchy:
        """A hierarchy file (the user's, or a pool's ``hierarchy.json``), checked against ``cfg``."""
        path = Path(path)
        obj = read_json(path, "hierarchy", f"a JSON file {SHAPE}", hook=_no_duplicate_keys)
        return cls.parse(obj, cfg, str(path))

    @classmethod
    def given(cls, hierarchy: str | Path | Hierarchy | Mapping | None, cfg: DatasetConfig) -> Hierarchy | None:
        """What a caller passes (a file, a parsed ``Hierarchy`` or a task -> class names mapping) as a Hierarchy."""
        if hierarchy is None or isinstance(hierarchy, Hierarchy):
            return hierarchy
        if isinstance(hierarchy, Mapping):
            return cls.parse(hierarchy, cfg, "given as a mapping")
        return cls.read(hierarchy, cfg)

    @property
    def id(self) -> str:
        """Hash of the content: the same sets of classes under the same names give the same id, in any order."""
        canon = json.dumps([self.dataset, sorted((t, sorted(c)) for t, c in self.tasks.items())])
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.source} (hierarchy {self.id}, {len(self.tasks)} tasks)"

    def names(self, cfg: DatasetConfig) -> dict[str, list[str]]:
        return {t: [cfg.class_name(c) for c in cls] for t, cls in self.tasks.items()}

    def record(self, cfg: DatasetConfig) -> dict[str, Any]:
        """What the manifest (and ``hierarchy.json``) records: the id and the tasks by class name."""
        return {"id": self.id, "tasks": self.names(cfg)}

    def apply(self, cfg: DatasetConfig) -> DatasetConfig:
        """``cfg`` with this hierarchy's tasks (``cfg`` itself for its built-in tasks: nothing changes)."""
        if self.builtin:
            return cfg
        default = list(self.tasks)[:DEFAULT_QUERY_TASKS]
        return dataclasses.replace(cfg, tasks={t: list(c) for t, c in self.tasks.items()}, default_tasks=default)


def _class_ids(
    task: str, names: list, index: dict[str, list[int]], owner: dict[int, str], cfg: DatasetConfig, source: str
) -> list[int]:
    """The class ids of one task's class names; ``owner`` (class -> task so far) keeps the tasks disjoint."""
    ids: list[int] = []
    for name in names:
        if not isinstance(name, str):
            raise PoEError(
                f"hierarchy {source}: task {task!r}: class names are strings, got {_json_type(name)} {json.dumps(name)}"
            )
        if name not in index:
            close = difflib.get_close_matches(name, index, n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(list(index)[:3])}"
            raise PoEError(f"hierarchy {source}: task {task!r}: unknown {cfg.name} class {name!r} ({hint})")
        if len(index[name]) > 1:
            raise PoEError(
                f"hierarchy {source}: task {task!r}: class name {name!r} names {len(index[name])} {cfg.name} classes "
                f"(ids {', '.join(map(str, index[name]))}); it cannot be told apart"
            )
        c = index[name][0]
        if c in ids:
            raise PoEError(f"hierarchy {source}: task {task!r} names class {name!r} twice")
        if c in owner:
            raise PoEError(
                f"hierarchy {source}: class {name!r} is in both task {owner[c]!r} and task {task!r}; tasks must be "
                "disjoint"
            )
        owner[c] = task
        ids.append(c)
    return ids


def _json_type(v: Any) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(v), "a number")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise PoEError(f"task {k!r} is given twice")
        seen[k] = v
    return seen


def _stored(root: Path, cfg: DatasetConfig) -> Hierarchy | None:
    """The pool folder's ``hierarchy.json``; None when it has none."""
    path = root / HIERARCHY_FILE
    if not path.is_file():
        return None
    h = Hierarchy.read(path, cfg)
    recorded = read_json(path, "hierarchy").get("id")
    if recorded is not None and recorded != h.id:
        raise PoEError(
            f"{path}: its content hash is {h.id} but the file records {recorded}: it was edited or "
            "damaged; restore it (the experts were built with the recorded one)"
        )
    return h


def recorded_hierarchy(cfg: DatasetConfig, root: Path, record: dict[str, Any] | None) -> Hierarchy:
    """The hierarchy of the pool at ``root``: the one its manifest records (``record``: the manifest's
    ``hierarchy``), else (a pool without a manifest, or of an earlier version) its ``hierarchy.json``, else the
    dataset's built-in tasks."""
    if record is None:
        return _stored(root, cfg) or Hierarchy.builtin_of(cfg)
    source = root / "manifest.json"
    h = Hierarchy.parse(record["tasks"], cfg, str(source)) if record["tasks"] else Hierarchy(cfg.name, {}, "")
    if h.id != record["id"]:
        raise PoEError(
            f"{source}: its hierarchy hashes to {h.id} but it records {record['id']}: the manifest was "
            "edited or damaged; restore it"
        )
    return Hierarchy.of(cfg, h.tasks, str(root / HIERARCHY_FILE))


def copy_notes(cfg: DatasetConfig, root: Path, h: Hierarchy) -> list[str]:
    """What is wrong with ``hierarchy.json`` (the readable copy) when the manifest records ``h``: the manifest's is
    used, and the note says how to rewrite the copy."""
    path = root / HIERARCHY_FILE
    fix = f"rewrite it from the manifest with: python -m PoE.build.migrate {root}"
    if not path.is_file():
        return [] if h.builtin else [f"{path} is missing; the tasks manifest.json records are used ({fix})"]
    try:
        stored = _stored(root, cfg)
    except PoEError as e:
        return [f"{e}; the tasks manifest.json records are used ({fix})"]
    if stored is not None and stored.id != h.id:
        return [
            f"{path} (hierarchy {stored.id}) is not the hierarchy manifest.json records ({h.id}): a command "
            f"changing the pool's tasks stopped after its commit, or the file was edited; the manifest's is used "
            f"({fix})"
        ]
    return []


def pool_hierarchy(cfg: DatasetConfig, root: Path, given: Hierarchy | None, contents: Contents) -> Hierarchy:
    """The hierarchy of the pool at ``root`` (its manifest's, read as ``contents``); a different ``given`` one is
    refused, and so is a ``hierarchy.json`` beside a bare pool that nobody named."""
    current = recorded_hierarchy(cfg, root, contents.hierarchy)
    bare = contents.parts is None and current.id != Hierarchy.builtin_of(cfg).id
    if bare and (given is None or given.id != current.id):
        # a bare pool records nothing of its tasks: a hierarchy file beside it is only taken when the user names it
        raise PoEError(
            f"the pool {root} has no manifest.json (the original release's format), so nothing vouches for "
            f"{root / HIERARCHY_FILE} beside it ({len(current.tasks)} tasks; a bare pool's tasks are "
            f"{cfg.name}'s built-in ones): remove that file, or give it with --hierarchy "
            f"{root / HIERARCHY_FILE} to use it"
        )
    if given is not None and given.id != current.id:
        none = (
            " (it holds no hierarchy.json: a pool built with --hierarchy keeps it there)"
            if contents.hierarchy is None and not (root / HIERARCHY_FILE).is_file()
            else ""
        )
        raise PoEError(
            f"the pool {root} was built with {current.describe()}{none}; --hierarchy {given.source} is "
            f"another (hierarchy {given.id}): omit --hierarchy to use the pool's, or give another "
            "--db"
        )
    return current


def hierarchy_to_build(cfg: DatasetConfig, root: Path, given: Hierarchy | None) -> Hierarchy:
    """The hierarchy a preprocessing run into the pool folder ``root`` builds: the pool's (its manifest's, of any
    version that records one, else its ``hierarchy.json``, else the built-in tasks), or ``given``. A pool holding
    experts keeps its hierarchy (another is refused; tasks are added and removed with ``--add_tasks`` and
    ``--remove_tasks``); one without experts may take a new one."""
    record = PoolPaths(root, cfg.tag).read_manifest().get("hierarchy")
    current = recorded_hierarchy(cfg, root, record if valid_record(record) else None)
    if not (given or current).tasks:
        raise PoEError(f"{cfg.name} has no built-in tasks: give them with --hierarchy tasks.json ({SHAPE})")
    if given is None or given.id == current.id:
        return current
    present = PoolPaths(root, cfg.tag).experts_present()
    if present:
        new = [t for t in given.tasks if t not in current.tasks]
        kept = all(given.tasks.get(t) == c for t, c in current.tasks.items())
        how = (
            f"to add its task(s) {', '.join(new)} to this pool, give the file with --add_tasks instead of --hierarchy"
            if kept and new
            else "tasks are removed with --remove_tasks NAME and added with --add_tasks FILE"
        )
        raise PoEError(
            f"the pool {root} holds {len(present)} expert(s) built with {current.describe()}; "
            f"--hierarchy {given.source} is another (hierarchy {given.id}): {how}; or build it into a "
            "new --db"
        )
    return given


def write_copy(root: Path, h: Hierarchy, cfg: DatasetConfig) -> None:
    """Write ``hierarchy.json``, the readable copy of the hierarchy the manifest records (after the manifest):
    nothing for the built-in tasks of a pool that has no copy, nothing when the copy is already ``h``."""
    path = root / HIERARCHY_FILE
    if h.builtin and not path.is_file():
        return
    try:
        if path.is_file() and read_json(path) == {"dataset": cfg.name, **h.record(cfg)}:
            return
    except PoEError:
        pass
    save_json(path, {"dataset": cfg.name, **h.record(cfg)})
