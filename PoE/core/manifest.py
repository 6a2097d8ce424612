"""The pool's table of contents: ``manifest.json`` lists every part file by its digest (``part_digest``, a hash
over the weights and the metadata), and a pool is opened only when the files present are exactly the ones listed.
It also records the size and SHA-256 of every file the answers depend on (each part, its shards, a folder dataset's
``dataset.json``): a file is checked against them before anything reads it. Its root digest (``Contents.digest``)
names the whole pool, so that a user can pin one: the manifest is not signed, and a consistent rewrite is a new pool.

Writers keep one order, so that the manifest always describes the files present even when a command is killed
midway: a part is added by writing its file first and the manifest last; it is removed by writing the manifest
without it first and deleting the file last. The manifest also records the pool's task hierarchy, so one write
commits a new expert together with the task table that names it (``hierarchy.json`` is a readable copy, written
after it). A file the manifest does not list is then one a command was adding or removing (or one copied in): an
expert of a task the manifest's hierarchy lacks is ignored with a note, any other is refused with a line saying
how to finish or undo. ``Contents`` is the reader's side (``PoE.query.pool``); ``build`` is the writer's, from the parts
a run holds in memory (``PoE.build.preprocess``, ``PoE.build.edit``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PoE.core.checkpoint import file_record, part_digest, read_recorded, save_json, shard_files
from PoE.core.datasets.folder import DESCRIPTION_FILE
from PoE.core.errors import PoEError
from PoE.core.pool_paths import PoolPaths

# 4: ``files`` records the size and SHA-256 of every file the pool's answers depend on (parts, their shards,
# dataset.json), checked before a file is read; 3: records the hierarchy; 2: ``parts`` lists every part by its
# digest; 1: weights ids only
MANIFEST_FORMAT = 4
READ_FORMATS = (3, MANIFEST_FORMAT)  # what opens (a format-3 pool of a folder dataset is refused: see Contents.read)
PART_FORMATS = (2, *READ_FORMATS)  # whose ``parts`` a writer takes over (a run into an earlier pool upgrades it)
EXPERT_FIELDS = ("classes", "test_acc", "test_n", "train_seconds", "epochs", "id", "library_id")


def part_name(paths: PoolPaths, path: Path) -> str:
    """A part's name in the manifest: its path inside the pool folder (``experts/expert_people.pt``)."""
    return path.relative_to(paths.root).as_posix()


def upgrade_hint(paths: PoolPaths) -> str:
    return f"python -m PoE.build.migrate {paths.root}"


@dataclass
class Contents:
    """What ``manifest.json`` says the pool holds: part name -> digest, and its hierarchy (``{"id", "tasks":
    {task: [class names]}}``); ``parts`` None for a pool without a manifest, which loads only when every file is
    bare (the original release's format)."""

    paths: PoolPaths
    parts: dict[str, str] | None
    hierarchy: dict[str, Any] | None = None
    signature: tuple = ()  # the files' state before they were read (``signature``): what a server watches
    files: dict[str, dict[str, Any]] | None = None  # name -> {"bytes", "sha256"}: checked before a file is read
    format: int = 0  # the manifest's format (0: no manifest, the original release's bare files)

    @classmethod
    def read(cls, paths: PoolPaths) -> Contents:
        """The manifest, read once (its hierarchy and its parts come from the same version of the file). A pool
        without one (the original release's bare files) is described by its files as they are now."""
        before = signature(paths)
        if not paths.manifest.exists():
            present = [paths.library, *map(paths.expert, paths.experts_present())]
            return cls(paths, None, None, before, {part_name(paths, p): file_record(p) for p in present if p.is_file()})
        manifest = paths.read_manifest()
        parts, fmt = manifest.get("parts"), manifest.get("manifest_format")
        if fmt not in PART_FORMATS or not isinstance(parts, dict):
            raise PoEError(
                f"{paths.manifest} lists no part digests (an earlier version wrote it), so its files cannot be "
                f"checked; check them and upgrade the pool with: {upgrade_hint(paths)}"
            )
        hierarchy = manifest.get("hierarchy")
        if fmt not in READ_FORMATS or not valid_record(hierarchy):
            raise PoEError(
                f"{paths.manifest} records no task hierarchy (an earlier version wrote it); upgrade the pool with: "
                f"{upgrade_hint(paths)}"
            )
        contents = cls(paths, {str(k): str(v) for k, v in parts.items()}, hierarchy, before, None, fmt)
        contents.files = contents.read_files(manifest.get("files"))
        return contents

    def read_files(self, files: Any) -> dict[str, dict[str, Any]] | None:
        """The manifest's ``files``, checked for shape; ``dataset.json`` checked against it now, before anything
        reads it. A format-3 manifest records no file hashes: it opens unless the pool has a ``dataset.json``,
        whose class names and image size it does not cover."""
        paths, described = self.paths, self.paths.root / DESCRIPTION_FILE
        if self.format == 3:
            if described.exists():
                raise PoEError(
                    f"{paths.manifest} (an earlier version's) does not cover {described}, which the pool's "
                    f"answers depend on (its class names and image size): check that file, then record it "
                    f"with: {upgrade_hint(paths)} --dataset folder"
                )
            return None
        ok = isinstance(files, dict) and all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in files.values()
        )
        if not ok or set(self.parts or {}) - set(files):
            raise PoEError(
                f"{paths.manifest} is damaged: its files table does not record every part's size and "
                "SHA-256; restore it, or remake the pool"
            )
        if DESCRIPTION_FILE in files or described.exists():
            if DESCRIPTION_FILE not in files:
                raise PoEError(f"{described} is not listed in {paths.manifest}: it was copied in; remove it")
            if not described.is_file():
                raise PoEError(
                    f"{paths.manifest} lists {DESCRIPTION_FILE}, which is missing from {paths.root}: "
                    "restore it, or remake the pool"
                )
            read_recorded(described, files[DESCRIPTION_FILE], paths.manifest)
        return {str(k): dict(v) for k, v in files.items()}

    @property
    def digest(self) -> str:
        """The pool's root digest: SHA-256 over what its answers depend on (the manifest's hierarchy, part digests
        and file hashes; a bare pool's file hashes). Equal digests, equal pools: ``--pool_digest`` pins one."""
        table = {"format": self.format, "hierarchy": self.hierarchy, "parts": self.parts, "files": self.files}
        return hashlib.sha256(json.dumps(table, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def verify(self, path: Path) -> bytes | None:
        """The bytes of ``path``, checked against the size and SHA-256 recorded for it before anything reads them;
        None when nothing records it (a format-3 manifest, an unlisted file: ``check`` refuses it once read)."""
        record = (self.files or {}).get(part_name(self.paths, path))
        return None if record is None else read_recorded(path, record, self.paths.manifest)

    def check(self, path: Path, state_dict: Mapping[str, Any], meta: dict[str, Any], remake: str) -> None:
        """Raise unless the part read from ``path`` (weights and metadata) is the one the manifest lists;
        ``remake`` is the command that makes the part (again)."""
        manifest = self.paths.manifest
        if self.parts is None:
            if meta:
                raise PoEError(
                    f"{path} was written by this project, but the pool has no {manifest.name}, the list its files "
                    f"are checked against (only the original release's bare files load without one); restore "
                    f"{manifest.name}, or remake the pool"
                )
            return
        if not meta:
            raise PoEError(
                f"{path} is a bare state dict (no metadata, nothing to check it against): bare files load only as "
                f"a whole original-release pool, without {manifest.name}; remove it, or make it with: {remake}"
            )
        name = part_name(self.paths, path)
        if name not in self.parts:
            raise PoEError(
                f"{path} is not listed in {manifest}: a command adding it was interrupted, or it was copied in; "
                f"finish with: {remake} (it is made again), or undo by removing the file"
            )
        got = part_digest({**meta, "state_dict": state_dict})
        if got != self.parts[name]:
            raise PoEError(
                f"{path} differs from the part {manifest.name} lists (digest {got}, listed {self.parts[name]}): it "
                f"was replaced or changed after the manifest was written; restore it, or make it again with: {remake}"
            )

    def lists(self, path: Path) -> bool:
        return self.parts is not None and part_name(self.paths, path) in self.parts

    def check_complete(self, present: list[Path]) -> None:
        """Raise if the manifest lists a part whose file is not there."""
        if self.parts is None:
            return
        gone = sorted(set(self.parts) - {part_name(self.paths, p) for p in present})
        if gone:
            raise PoEError(
                f"{self.paths.manifest} lists {gone[0]}, which is missing from {self.paths.root}: restore it, or "
                "remake it"
            )


def valid_record(record: Any) -> bool:
    """Whether ``record`` has the shape of a manifest's hierarchy (its classes are checked by ``PoE.core.tasks``)."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("id"), str)
        and isinstance(record.get("tasks"), dict)
        and all(isinstance(v, list) for v in record["tasks"].values())
    )


def signature(paths: PoolPaths) -> tuple:
    """A cheap fingerprint of the pool's table of contents (inode, size and mtime of ``manifest.json`` and
    ``hierarchy.json``; writers replace them atomically, so every write gives a new inode)."""
    out = []
    for path in paths.watched:
        try:
            st = os.stat(path)
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass
class Listing:
    """The parts a run knows of, in memory: what the pool's manifest listed when the run began, updated as the
    run writes, adopts or removes parts. ``build`` turns it into the manifest; no checkpoint is read again."""

    paths: PoolPaths
    digests: dict[str, str] = field(default_factory=dict)  # part name -> digest
    experts: dict[str, dict[str, Any]] = field(default_factory=dict)  # task -> what the manifest records of it
    library: dict[str, Any] = field(default_factory=dict)  # the library's metadata (its ``id`` above all)
    old: dict[str, Any] = field(default_factory=dict)  # the manifest as it was (stage times, data checksum)
    hierarchy: dict[str, Any] | None = None  # {"id", "tasks": {task: [class names]}}: committed with the parts

    @classmethod
    def read(cls, paths: PoolPaths) -> Listing:
        """The pool's manifest as it is; an unreadable or earlier-format one lists nothing (its files must then
        be made again, or upgraded with ``PoE.build.migrate``)."""
        try:
            old = paths.read_manifest()
        except PoEError:
            old = {}
        listing = cls(paths, old=old)
        parts = listing.old.get("parts")
        if listing.old.get("manifest_format") in PART_FORMATS and isinstance(parts, dict):
            listing.digests = {str(k): str(v) for k, v in parts.items()}
            experts = listing.old.get("experts")
            for t, e in (experts if isinstance(experts, dict) else {}).items():
                if isinstance(e, dict) and part_name(paths, paths.expert(str(t))) in listing.digests:
                    listing.experts[str(t)] = dict(e)
            if part_name(paths, paths.library) in listing.digests:
                listing.library = {"id": listing.old.get("library_id")}
            if valid_record(listing.old.get("hierarchy")):
                listing.hierarchy = listing.old["hierarchy"]
        return listing

    def lists(self, path: Path, payload: Mapping[str, Any]) -> bool:
        """Whether ``payload`` (a checkpoint as read) is the part the manifest lists for ``path``."""
        return self.digests.get(part_name(self.paths, path)) == part_digest(payload)

    def add(self, path: Path, payload: Mapping[str, Any]) -> None:
        """Record a part written (or adopted) at ``path``; its file must already be in place."""
        self.digests[part_name(self.paths, path)] = part_digest(payload)
        meta = {k: v for k, v in payload.items() if k != "state_dict"}
        if payload.get("kind") == "expert":
            self.experts[str(payload["task"])] = {k: meta.get(k) for k in EXPERT_FIELDS}
        elif payload.get("kind") == "library":
            self.library = meta

    def drop(self, path: Path) -> None:
        """Forget a part that is about to be removed (write the manifest, then delete the file)."""
        self.digests.pop(part_name(self.paths, path), None)
        for task in [t for t in self.experts if self.paths.expert(t) == path]:
            del self.experts[task]
        if path == self.paths.library:
            self.library = {}

    def present(self) -> None:
        """Forget parts whose files are gone (removed by hand): the manifest describes the files present."""
        for name in [n for n in self.digests if not (self.paths.root / n).is_file()]:
            self.drop(self.paths.root / name)


TABLE = ("manifest_format", "hierarchy", "library_id", "experts", "parts", "files")  # what ``build`` writes


def build(listing: Listing, run: dict[str, Any]) -> dict[str, Any]:
    """The manifest: ``run`` (dataset, settings, stage records, machine: what the run says of itself) and the
    table of contents, ``parts`` and its per-expert summary, from ``listing``."""
    listing.present()
    if listing.hierarchy is None:
        raise ValueError("a manifest records the pool's hierarchy")
    return {
        "manifest_format": MANIFEST_FORMAT,
        **{k: v for k, v in run.items() if k not in TABLE},
        "hierarchy": listing.hierarchy,
        "library_id": listing.library.get("id"),
        "experts": dict(sorted(listing.experts.items())),
        "parts": dict(sorted(listing.digests.items())),
        "files": files_table(listing),
    }


def files_table(listing: Listing) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every file the manifest is about to list: each part, its shards, ``dataset.json``. Taken
    from the files as the writer (holding the pool's lock) left them."""
    root = listing.paths.root
    files = [root / name for name in listing.digests]
    files += [shard for path in list(files) for shard in shard_files(path)]
    files += [root / DESCRIPTION_FILE] if (root / DESCRIPTION_FILE).is_file() else []
    return {part_name(listing.paths, p): file_record(p) for p in sorted(files)}


def write(listing: Listing, run: dict[str, Any]) -> None:
    """Write the manifest atomically (always after the part files it lists)."""
    save_json(listing.paths.manifest, build(listing, run))


def edited(old: dict[str, Any], command: str, **change: list[str]) -> dict[str, Any]:
    """The run record of a pool after an add or a remove: the build's record kept, the edit appended to
    ``edits`` (``added`` or ``removed`` tasks, and the command)."""
    return {**old, "edits": [*old.get("edits", []), {**change, "command": command}]}
