"""A pool of experts held in memory: read and checked once, then queried without disk or training.

``Pool.open`` reads the library and every expert present and refuses a pool whose parts do not agree:
each part written by this project records the content hash of its weights (``id``) and each expert the
id of the library it was extracted from (``library_id``); a hash that does not match, an expert of
another library, or weights that are not finite end with one line naming the file. The original
release's bare state dicts carry no metadata: they load, and ``notes`` says they could not be checked. The tasks
are the ones the manifest records; an expert file it does not list, of a task it does not name (left by an add or
a remove that was killed), is ignored with a note.
``Pool.query`` consolidates the library and the queried experts into a ``TaskModel`` from memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.core.consolidate import ConsolidatedNet
from PoE.core.datasets import DatasetConfig, described_by_pool, get_dataset
from PoE.core.errors import PoEError
from PoE.core.manifest import Contents
from PoE.core.networks import bank_of, family_of, family_of_state
from PoE.core.query import Query, make_query
from PoE.core.runtime import CPU, Runtime
from PoE.core.store import (
    PoolPaths,
    load_checkpoint,
    load_into,
    resolve_pool,
    state_id,
    unwrap,
)
from PoE.core.tasks import (
    Hierarchy,
    copy_notes,
    pool_hierarchy,
    recorded_hierarchy,
)
from PoE.query.model import TaskModel

DIGEST_HEX = 64
BANK_CACHE = 32  # banks of expert sets kept for reuse (``bank(cached=True)``: the service on a GPU)


def check_digest_text(digest: str | None) -> str | None:
    """A pinned digest as given (``--pool_digest``): 64 hex digits, as ``--list`` shows them."""
    if digest is None:
        return None
    text = str(digest).strip().lower()
    if len(text) != DIGEST_HEX or any(c not in "0123456789abcdef" for c in text):
        raise PoEError(
            f"--pool_digest {str(digest)[:80]!r}: expected the pool's {DIGEST_HEX} hex digits, as "
            "Run_Service.py --list shows them"
        )
    return text


def make_command(cfg: DatasetConfig, task: str | None = None, paths: PoolPaths | None = None) -> str:
    """The command that makes the library (``task`` None) or ``task``'s expert (into the pool at ``paths``)."""
    what = f"--stages experts --tasks {task}" if task else "--stages library"
    db = f" --db {paths.root.parent}" if paths is not None else ""
    return f"python Run_preprocessing.py --dataset {cfg.name}{db} {what}"


def how_to_make(cfg: DatasetConfig, task: str | None = None) -> str:
    return f"create it with: {make_command(cfg, task)}"


def check_weights(module: nn.Module, meta: dict[str, Any], path: Path, what: str) -> bool:
    """Raise unless ``module``'s weights are finite and match the content hash ``meta`` records; returns
    whether there was a hash to check (bare state dicts have none)."""
    for name, t in module.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise PoEError(f"{path}: {what} has non-finite weights ({name} holds NaN or inf); rebuild it")
    if "id" not in meta:
        return False
    got = state_id(module)
    if got != meta["id"]:
        raise PoEError(
            f"{path}: the {what}'s weights do not match the content hash recorded in the file (expected "
            f"{meta['id']}, got {got}): the file was changed or damaged; rebuild it"
        )
    return True


def read_library(paths: PoolPaths, cfg: DatasetConfig, contents: Contents) -> tuple[nn.Module, dict[str, Any]]:
    """The library of a pool folder, checked; its metadata ({} for the original release's bare files)."""
    path = paths.library
    sd, meta = unwrap(load_checkpoint(path, how_to_make(cfg), contents.verify), path, "library")
    contents.check(path, sd, meta, make_command(cfg, None, paths))
    if meta and meta.get("dataset") not in (None, cfg.name):
        raise PoEError(f"{path} is a library for {meta.get('dataset')}, not {cfg.name}")
    try:
        library = family_of(cfg).library_from_state(sd, cfg)
    except ValueError as e:
        raise PoEError(f"{path} does not hold a {cfg.name} library ({e})") from None
    load_into(library, sd, path, f"{cfg.name} library")
    check_weights(library, meta, path, "library")
    return library.eval(), meta


def read_expert(
    paths: PoolPaths,
    cfg: DatasetConfig,
    task: str,
    library: nn.Module,
    library_meta: dict[str, Any],
    contents: Contents,
) -> tuple[nn.Module, dict[str, Any]]:
    """One expert of a pool folder, checked against the manifest, its task and the pool's library."""
    path = paths.expert(task)
    sd, meta = unwrap(load_checkpoint(path, how_to_make(cfg, task), contents.verify), path, "expert")
    contents.check(path, sd, meta, make_command(cfg, task, paths))
    want = cfg.tasks[task]
    if meta and (meta.get("task") != task or list(meta.get("classes", want)) != list(want)):
        raise PoEError(f"{path} holds the expert of {meta.get('task')!r} {meta.get('classes')}, not {task!r} {want}")
    lib_id, own = library_meta.get("id") or state_id(library), meta.get("library_id")
    if own and own != lib_id:
        raise PoEError(
            f"{path} was extracted from library {own}, but the pool's library {paths.library.name} is {lib_id}: "
            f"they do not belong together; {how_to_make(cfg, task)} --retrain experts"
        )
    try:
        expert = family_of_state(sd, meta).expert_from_state(sd)
    except ValueError as e:
        raise PoEError(f"{path} does not hold an expert ({e})") from None
    in_channels = library.out_channels
    if expert.num_classes != len(want) or expert.in_channels != in_channels:
        raise PoEError(
            f"{path} does not fit: it has {expert.num_classes} outputs on {expert.in_channels} input channels, "
            f"task {task!r} needs {len(want)} outputs on the library's {in_channels} channels"
        )
    load_into(expert, sd, path, f"expert of {task!r}")
    check_weights(expert, meta, path, f"expert of {task!r}")
    return expert.eval(), meta


@dataclass(frozen=True)
class PoolFolder:
    """A pool folder as a command reads it, once: where it is, its table of contents (the manifest: the parts and
    the hierarchy come from the same version of the file), and the dataset with the pool's tasks. ``missing``: why
    there is no pool there (``read(missing_ok=True)``; the tasks are then the dataset's or ``hierarchy``'s)."""

    cfg: DatasetConfig
    paths: PoolPaths
    contents: Contents
    pinned: str | None = None  # the digest it was read against (``expected_digest``)
    missing: str | None = None

    @classmethod
    def read(
        cls,
        db: str | Path,
        dataset: str = "cifar100",
        hierarchy: str | Path | Hierarchy | Mapping | None = None,
        skip_bad_images: bool = False,
        expected_digest: str | None = None,
        missing_ok: bool = False,
    ) -> PoolFolder:
        """``db``: a folder holding ``<dataset>/`` or a pool folder itself. A ``hierarchy`` other than the pool's is
        refused; so is a pool whose root digest is not ``expected_digest``."""
        pinned = check_digest_text(expected_digest)
        cfg, missing = get_dataset(dataset), None
        try:
            paths = resolve_pool(db, cfg.name, cfg.tag)
        except PoEError as e:
            if not missing_ok:
                raise
            paths, missing = PoolPaths(Path(db) / cfg.name, cfg.tag), str(e)
        contents = Contents.read(paths)
        if pinned is not None and missing is None and contents.digest != pinned:
            raise PoEError(
                f"the pool {paths.root} has digest {contents.digest}, not the pinned {pinned} "
                "(--pool_digest): it is another pool, or it was changed"
            )
        cfg = described_by_pool(cfg, paths.root, skip_bad_images)  # dataset.json: checked by Contents.read
        cfg = pool_hierarchy(cfg, paths.root, Hierarchy.given(hierarchy, cfg), contents).apply(cfg)
        return cls(cfg, paths, contents, pinned, missing)


class Pool:
    """The library and every expert of one pool folder, loaded and checked, on ``device``."""

    def __init__(
        self,
        cfg: DatasetConfig,
        paths: PoolPaths,
        runtime: Runtime = CPU,
        contents: Contents | None = None,
    ) -> None:
        t0 = time.perf_counter()
        self.cfg, self.paths, self.runtime = cfg, paths, runtime
        contents = Contents.read(paths) if contents is None else contents  # the table of contents checked against
        self.signature = contents.signature  # the manifest's state before it was read: a server reloads on a change
        self.digest = contents.digest  # the root digest: what --pool_digest pins
        self.pinned: str | None = None  # the digest this pool was opened against (``open``'s expected_digest)
        notes = self.check_tasks(contents)
        listed = [
            t
            for t in paths.experts_present()
            if t in cfg.tasks or contents.hierarchy is None or contents.lists(paths.expert(t))
        ]
        for task in sorted(set(paths.experts_present()) - set(listed)):  # left by an interrupted add or remove
            notes.append(
                f"{paths.expert(task)} is ignored: task {task!r} is not in the hierarchy {paths.manifest} "
                "records (an add stopped before its commit, or a remove before it deleted the file); finish "
                "by running the command again, or delete the file"
            )
        contents.check_complete([paths.library, *map(paths.expert, listed)])
        self.library, self.library_meta = read_library(paths, cfg, contents)
        self.experts: dict[str, nn.Module] = {}
        self.expert_meta: dict[str, dict[str, Any]] = {}
        for task in listed:
            if task not in cfg.tasks:
                lost = (
                    ""
                    if (paths.root / "hierarchy.json").exists()
                    else (" (a pool built with --hierarchy keeps its tasks in hierarchy.json, which this one lacks)")
                )
                raise PoEError(
                    f"{paths.expert(task)} is not a task of this pool{lost}; known tasks: {', '.join(cfg.tasks)}"
                )
            self.experts[task], self.expert_meta[task] = read_expert(
                paths, cfg, task, self.library, self.library_meta, contents
            )
        for m in (self.library, *self.experts.values()):  # channels_last weights: the fast layout for convolutions
            m.to(self.device, memory_format=torch.channels_last)
        self.states = {t: e.state_dict() for t, e in self.experts.items()}  # what a query's bank is cut from
        self._banks: OrderedDict[tuple[str, ...], nn.Module] = OrderedDict()
        self.open_ms = (time.perf_counter() - t0) * 1e3  # reading and checking every part
        unchecked = [paths.library.name] if "id" not in self.library_meta else []
        unchecked += [f"expert_{t}.pt" for t, m in self.expert_meta.items() if "id" not in m]
        self.notes = notes + (
            [
                f"{len(unchecked)} part(s) carry no content hash (e.g. {unchecked[0]}; the original release's "
                "format): they were loaded but could not be checked"
            ]
            if unchecked
            else []
        )

    def check_tasks(self, contents: Contents) -> list[str]:
        """Refuse tasks other than the ones the manifest records; notes on ``hierarchy.json``, its readable copy."""
        if contents.hierarchy is None:
            return []
        given = Hierarchy.of(self.cfg)
        recorded = recorded_hierarchy(self.cfg, self.paths.root, contents.hierarchy)
        if given.id != recorded.id:
            raise PoEError(
                f"the tasks given ({len(given.tasks)}, hierarchy {given.id}) are not the ones "
                f"{self.paths.manifest} records ({len(recorded.tasks)}, hierarchy {recorded.id}); open "
                "the pool with Pool.open, which reads them from there"
            )
        return copy_notes(self.cfg, self.paths.root, recorded)

    @classmethod
    def open(
        cls,
        db: str | Path = "DB_PoE",
        dataset: str = "cifar100",
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        hierarchy: str | Path | Hierarchy | Mapping | None = None,
        skip_bad_images: bool = False,
        expected_digest: str | None = None,
        *,
        runtime: Runtime | None = None,
    ) -> Pool:
        """``db`` is a folder holding ``<dataset>/`` (as ``DB_PoE``) or a pool folder itself. The tasks are the
        hierarchy the pool stores (else the dataset's built-in ones); a different ``hierarchy`` is refused. A
        folder dataset is as the pool describes it (``skip_bad_images``: when its test images are read).
        ``expected_digest``: refuse any pool whose root digest (``digest``, shown by ``--list``) is another.
        ``device`` and ``precision`` (fp32, bf16 or auto) are resolved here unless a command's ``runtime`` is given.
        """
        runtime = runtime or Runtime.resolve(device, precision)  # fp8 and others refused in one line
        return cls.load(PoolFolder.read(db, dataset, hierarchy, skip_bad_images, expected_digest), runtime)

    @classmethod
    def load(cls, folder: PoolFolder, runtime: Runtime = CPU) -> Pool:
        """The parts of a pool folder already read (``PoolFolder.read``: a command reads it once)."""
        if folder.missing is not None:
            raise PoEError(folder.missing)
        pool = cls(folder.cfg, folder.paths, runtime, folder.contents)
        pool.pinned = folder.pinned
        return pool

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @property
    def precision(self) -> str:
        """The resolved precision: fp32 or bf16."""
        return self.runtime.precision

    @property
    def root(self) -> Path:
        return self.paths.root

    @property
    def id(self) -> str | None:
        return self.library_meta.get("id")

    def part_id(self, task: str | None = None) -> str:
        """The content id of the library (``task`` None) or of ``task``'s expert: the recorded one, or computed
        for the original release's bare files, which record none."""
        if task is None:
            return self.library_meta.get("id") or state_id(self.library)
        return self.expert_meta[task].get("id") or state_id(self.experts[task])

    def make_query(self, tasks: list[str]) -> Query:
        if isinstance(tasks, str) or not isinstance(tasks, list | tuple) or not all(isinstance(t, str) for t in tasks):
            raise PoEError(f"a query is a list of task names, e.g. ['people', 'vehicles_1'], got {tasks!r}")
        query = make_query(list(tasks), self.cfg.tasks, self.cfg.name)
        missing = [t for t in query.tasks if t not in self.experts]
        if missing:
            raise PoEError(f"missing {self.paths.expert(missing[0])}; {how_to_make(self.cfg, missing[0])}")
        return query

    def cached_banks(self) -> int:
        """How many banks ``bank(cached=True)`` holds now (at most ``BANK_CACHE``)."""
        return len(self._banks)

    def bank(self, tasks: list[str], cached: bool = False) -> nn.Module:
        """The experts of ``tasks`` (known to be here) as one bank, in this order, in eval mode. ``cached``: kept
        for the next call with the same tasks (the last 32 task lists; the service's batches ask again and again)."""
        key = tuple(tasks)
        if cached and key in self._banks:
            self._banks.move_to_end(key)
            return self._banks[key]
        bank = bank_of([self.experts[t] for t in tasks], [self.states[t] for t in tasks])
        if cached:
            self._banks[key] = bank
            while len(self._banks) > BANK_CACHE:
                self._banks.popitem(last=False)
        return bank

    def query(self, tasks: list[str]) -> TaskModel:
        """Consolidate the library and the experts of ``tasks`` into one network: the shared library and a new
        bank of the experts' weights (concatenated once per query; no training, no disk)."""
        t0 = time.perf_counter()
        query = self.make_query(tasks)
        module = ConsolidatedNet(self.library, self.bank(list(query.tasks)), query)
        module.training = False  # its parts are in eval mode already; .eval() would walk every one of them
        module.order = module.order.to(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        model = TaskModel(module, query, self.cfg, self.runtime, ms)
        model.pool = self
        return model

    def describe(self) -> dict[str, Any]:
        """Dataset, library and, per task, its classes (id and name), whether its expert is here and its
        accuracy on its own task (as recorded in the expert's file, in % to 2 decimals: the file holds float32
        noise such as 68.00000071525574)."""
        tasks = []
        for task, classes in self.cfg.tasks.items():
            meta = self.expert_meta.get(task, {})
            acc = meta.get("test_acc")
            tasks.append(
                {
                    "name": task,
                    "classes": [{"id": c, "name": self.cfg.class_name(c)} for c in classes],
                    "present": task in self.experts,
                    "accuracy": None if acc is None else round(float(acc), 2),
                }
            )
        return {
            "dataset": self.cfg.name,
            "pool": str(self.root),
            "library_id": self.id,
            "pool_digest": self.digest,
            "experts_present": len(self.experts),
            "tasks": tasks,
            "notes": self.notes,
        }
