"""Upgrade a pool written by an earlier version to the current format: every part records its digest over weights
and metadata, and the manifest lists them all and records the pool's hierarchy. Usage: ``python -m PoE.build.migrate
DB_PoE/cifar100 [more pools] [--dataset cifar100]``.

Nothing is taken on trust: each file's metadata must agree with what the old manifest recorded of it (ids,
accuracies, classes, library), and the pool must pass every check of ``Pool`` before anything is written. A pool
of format 1 (weights ids only) has its part files rewritten (same weights, same metadata); one of format 2 (digests,
no hierarchy) or 3 (no file hashes) keeps every part file as it is: format 3's ``dataset.json`` (a folder dataset's
class names and image size), which nothing recorded, is recorded as it is found, so check it before upgrading. The
new manifest is written last. On a current pool it rewrites a ``hierarchy.json`` that is not the hierarchy the
manifest records (a command stopped after its commit).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PoE.build.edit import editing
from PoE.build.preprocess import summary
from PoE.core.datasets import described_by_pool, get_dataset
from PoE.core.datasets.folder import DESCRIPTION_FILE
from PoE.core.errors import PoEError
from PoE.core.manifest import EXPERT_FIELDS, MANIFEST_FORMAT, Contents, Listing, build
from PoE.core.store import PoolPaths, load_checkpoint, resolve_pool, save_checkpoint, save_json, seal, unwrap
from PoE.core.tasks import copy_notes, recorded_hierarchy, write_copy
from PoE.query.pool import Pool


def agree(path: Path, meta: dict[str, Any], recorded: dict[str, Any] | None, fields: Sequence[str]) -> None:
    """Raise unless ``meta`` holds what the old manifest recorded of the part (the fields it recorded)."""
    if not recorded:
        raise PoEError(f"{path} is not recorded in the pool's manifest.json: it cannot be vouched for; remove it")
    for k in fields:
        if k in recorded and recorded[k] != meta.get(k):
            raise PoEError(f"{path}: its {k} ({meta.get(k)!r}) differs from manifest.json's ({recorded[k]!r})")


def upgrade(paths: PoolPaths, dataset: str) -> str:
    """Upgrade one pool folder; what was done, in one line."""
    if not paths.manifest.is_file():
        raise PoEError(
            f"{paths.root} has no manifest.json: nothing records what its files should be (a pool of "
            "bare files, the original release's format, loads as it is)"
        )
    old = paths.read_manifest()
    base = described_by_pool(get_dataset(dataset), paths.root)
    if old.get("manifest_format") == MANIFEST_FORMAT:
        Pool.open(paths.root, dataset)  # every check
        h = recorded_hierarchy(base, paths.root, old["hierarchy"])
        stale = copy_notes(base, paths.root, h)
        write_copy(paths.root, h, base)
        return f"{paths.root}: already current" + ("; hierarchy.json rewritten from the manifest" if stale else "")
    if old.get("manifest_format") == 3:  # parts and hierarchy current: the manifest gains the files' hashes
        h = recorded_hierarchy(base, paths.root, old["hierarchy"])
        listing = Listing.read(paths)
        listing.hierarchy = h.record(base)
        Pool(h.apply(base), paths, contents=Contents(paths, dict(listing.digests), listing.hierarchy))
        save_json(paths.manifest, build(listing, listing.old))
        note = f" ({DESCRIPTION_FILE} recorded as it is now: nothing covered it before)"
        note = note if (paths.root / DESCRIPTION_FILE).is_file() else ""
        return f"{paths.root}: upgraded; manifest.json records every file's size and SHA-256, no part rewritten{note}"
    h = recorded_hierarchy(base, paths.root, None)  # how the earlier versions kept it: hierarchy.json or none
    cfg = h.apply(base)
    if old.get("manifest_format") == 2:  # the parts are current: the manifest only gains the hierarchy
        listing = Listing.read(paths)
        listing.hierarchy = h.record(base)
        Pool(cfg, paths, contents=Contents(paths, dict(listing.digests), listing.hierarchy))  # every check
        save_json(paths.manifest, build(listing, listing.old))
        return f"{paths.root}: upgraded; manifest.json records the hierarchy ({len(h.tasks)} tasks), no part rewritten"
    listing = Listing(paths, old={k: v for k, v in old.items() if k not in ("library_id", "experts", "parts")})
    listing.hierarchy = h.record(base)
    payloads = {}
    tasks = paths.experts_present()
    for path, task in ((paths.library, None), *((paths.expert(t), t) for t in tasks)):
        sd, meta = unwrap(load_checkpoint(path), path, "expert" if task else "library")
        if not meta:
            raise PoEError(f"{path} is a bare state dict (no metadata) in a pool with a manifest; remove it")
        if task is None:
            agree(path, meta, {"id": old.get("library_id"), **(old.get("library") or {})}, ("id", *summary(meta)))
        else:
            agree(path, meta, (old.get("experts") or {}).get(task), EXPERT_FIELDS)
        payloads[path] = seal({**meta, "state_dict": sd})
        listing.add(path, payloads[path])
    gone = sorted(set(old.get("experts") or {}) - set(tasks))
    if gone:
        raise PoEError(f"manifest.json records the expert of {gone[0]!r}, but {paths.expert(gone[0])} is missing")
    Pool(cfg, paths, contents=Contents(paths, dict(listing.digests), listing.hierarchy))  # every other check
    for path, payload in payloads.items():
        save_checkpoint(path, payload)
    save_json(paths.manifest, build(listing, listing.old))
    return f"{paths.root}: upgraded; {len(payloads)} parts now carry digests over weights and metadata"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m PoE.build.migrate", description=__doc__.split("\n\n")[0])
    p.add_argument("pools", nargs="+", help="pool folders (e.g. DB_PoE/cifar100) or folders holding <dataset>/")
    p.add_argument("--dataset", default="cifar100", help="the pools' dataset")
    a = p.parse_args(argv)
    try:
        cfg = get_dataset(a.dataset)
        for db in a.pools:
            paths = resolve_pool(db, cfg.name, cfg.tag)
            with editing(paths.root):  # no other command writes the pool meanwhile
                print(upgrade(paths, cfg.name))
    except PoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
