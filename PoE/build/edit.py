"""Adding tasks to a built pool and removing them, in place (``Run_preprocessing.py --add_tasks FILE`` and
``--remove_tasks NAME ...``).

The pool's manifest is the commit: it records the parts and the hierarchy together. An add trains only the new
tasks' experts (``PoE.build.stages``, on the pool's library and the Oracle's cached logits), writes their files,
then the manifest; a remove writes the manifest without the tasks first, then deletes their files.
``hierarchy.json``, the readable copy, follows the manifest. No other file of the pool is written. Killed at any
point, the pool opens as the old one or the new one; a file left between (an expert the manifest does not list, of a
task its hierarchy lacks) is ignored with a note by ``Pool``, and running the command again completes it. One edit
at a time: a command that changes the pool holds a lock on its folder."""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PoE.core import manifest
from PoE.core.errors import PoEError
from PoE.core.store import HIERARCHY_FILE, TASK_RULE, PoolPaths, shard_files, valid_task_name
from PoE.core.tasks import Hierarchy, write_copy
from PoE.query.pool import Pool


@contextlib.contextmanager
def editing(root: Path, create: bool = False) -> Iterator[None]:
    """Hold the pool folder's lock (``flock`` on the folder itself: no file is created) while a command writes
    the pool (a build, a retrain, an add, a remove, a migration); a second one is refused at once rather than
    overwrite the first one's manifest. ``create``: make the folder first (a new pool), and remove it again if the
    command leaves it empty."""
    made = [p for p in (root, *root.parents) if not p.exists()] if create else []
    fd = None
    try:
        try:
            if made:
                root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root, os.O_RDONLY)
        except OSError as e:
            raise PoEError(f"cannot write into {root}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PoEError(
                f"another command is writing the pool {root} (a build, retrain, add, remove or migration); "
                "wait for it to finish, then run this one again"
            ) from None
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
        for folder in made:  # from the pool folder up: only those this call made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()


@dataclass(frozen=True)
class Addition:
    """What ``--add_tasks`` will do: the pool's hierarchy afterwards (its tasks, then the new ones) and the new
    tasks, whose experts the run trains (none: every task of the file is in the pool already)."""

    hierarchy: Hierarchy
    new: list[str]


def plan_addition(pool: Pool, added: Hierarchy, flag: str = "--add_tasks") -> Addition:
    """Check ``added`` (a hierarchy file: new tasks, and maybe tasks of the pool, unchanged) against the opened
    ``pool``: a task of the pool given with other classes, or a class that is in another task of the pool, is
    refused in one line saying how to remove that task."""
    cfg, src = pool.cfg, f"{flag} {added.source}"
    if not pool.paths.manifest.is_file():
        raise PoEError(
            f"{flag}: the pool {pool.root} has no manifest.json (the original release's format), so "
            "nothing would record the new tasks; add tasks to a pool this project built"
        )
    owner = {c: t for t, classes in cfg.tasks.items() for c in classes}
    new = []
    for task, classes in added.tasks.items():
        if task in cfg.tasks:
            if sorted(cfg.tasks[task]) != classes:
                have = ", ".join(cfg.class_name(c) for c in cfg.tasks[task])
                raise PoEError(
                    f"{src}: task {task!r} is in the pool {pool.root} with other classes ({have}); to "
                    f"change it, remove it first with --remove_tasks {task}, then add it"
                )
            continue
        for c in classes:
            if c in owner:
                raise PoEError(
                    f"{src}: class {cfg.class_name(c)!r} of task {task!r} is in the pool's task "
                    f"{owner[c]!r}; tasks must be disjoint (remove that task first with --remove_tasks "
                    f"{owner[c]})"
                )
        new.append(task)
    tasks = {**{t: sorted(c) for t, c in cfg.tasks.items()}, **{t: added.tasks[t] for t in new}}
    return Addition(Hierarchy.of(cfg, tasks, str(added.source)), new)


def last_removed(paths: PoolPaths) -> set[str]:
    """The tasks the manifest's last edit removed: a remove killed after its commit is finished by running it
    again, whatever of its files it had deleted."""
    edits = paths.read_manifest().get("edits")
    last = edits[-1] if isinstance(edits, list) and edits and isinstance(edits[-1], dict) else {}
    removed = last.get("removed")
    return {t for t in removed if isinstance(t, str)} if isinstance(removed, list) else set()


def remove_tasks(pool: Pool, names: list[str], command: str) -> list[str]:
    """Remove ``names`` from the opened ``pool``: the manifest without them first, then their experts' files, then
    ``hierarchy.json``. A name the pool does not know is refused with the closest ones, unless only its file is
    left (a remove stopped before the deletion): that file is deleted. Returns what was done, a line each."""
    cfg, paths = pool.cfg, pool.paths
    if not paths.manifest.is_file():
        raise PoEError(
            f"--remove_tasks: the pool {pool.root} has no manifest.json (the original release's format), "
            "so nothing would record the change; remove the files by hand"
        )
    names = list(dict.fromkeys(names))
    for t in names:  # before any path is made of it: a name is a plain word, never a path
        if not valid_task_name(t):
            raise PoEError(f"--remove_tasks: {t!r} is not a task name (use {TASK_RULE})")
    leftover = [t for t in names if t not in cfg.tasks and paths.expert(t).is_file()]
    done = last_removed(paths)  # the names an interrupted remove committed: run again, it finishes
    unknown = [t for t in names if t not in cfg.tasks and t not in leftover and t not in done]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(cfg.tasks), n=3, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else f"its tasks: {', '.join(cfg.tasks)}"
        raise PoEError(f"--remove_tasks: {unknown[0]!r} is not a task of the pool {pool.root} ({hint})")
    gone = [t for t in names if t in cfg.tasks]
    if gone and len(gone) == len(cfg.tasks):
        raise PoEError(
            f"--remove_tasks would leave the pool {pool.root} without tasks; keep at least one (or delete the folder)"
        )
    h = Hierarchy.of(cfg, {t: c for t, c in cfg.tasks.items() if t not in gone}, str(paths.root / HIERARCHY_FILE))
    if gone:
        listing = manifest.Listing.read(paths)
        for task in gone:
            listing.drop(paths.expert(task))
        listing.hierarchy = h.record(cfg)
        manifest.write(listing, manifest.edited(listing.old, command, removed=gone))  # the commit
    lines = []
    for task in [*gone, *leftover]:
        path = paths.expert(task)
        for shard in shard_files(path):
            shard.unlink(missing_ok=True)
        there = path.is_file()
        path.unlink(missing_ok=True)
        if task in leftover:
            lines.append(f"deleted {path}, left by an interrupted remove (or add) of {task!r}")
        else:
            lines.append(f"removed task {task!r}" + (f" and its expert {path}" if there else " (it had no expert)"))
    lines += [
        f"task {t!r} was removed already (by the command that was interrupted); nothing left of it"
        for t in names
        if t in done and t not in gone and t not in leftover
    ]
    write_copy(paths.root, h, cfg)
    kept = [t for t in pool.experts if t not in gone]
    lines.append(f"pool {paths.root}: {len(h.tasks)} task(s), {len(kept)} expert(s)")
    return lines
