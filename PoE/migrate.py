"""Upgrade a pool written by an earlier version (parts hashed by their weights only, a manifest without digests)
to the current format: every part then records its digest over weights and metadata, and the manifest lists
them all. Usage: ``python -m PoE.migrate DB_PoE/cifar100 [more pools] [--dataset cifar100]``.

Nothing is taken on trust: each file's metadata must agree with what the old manifest recorded of it (ids,
accuracies, classes, library), and the pool must pass every check of ``Pool`` before anything is written; the
part files are then rewritten (same weights, same metadata) and the new manifest is written last.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PoE.datasets import get_dataset
from PoE.errors import PoEError
from PoE.manifest import EXPERT_FIELDS, MANIFEST_FORMAT, Contents, Listing, build
from PoE.pool import Pool
from PoE.preprocess import summary
from PoE.store import PoolPaths, load_checkpoint, resolve_pool, save_checkpoint, save_json, seal, unwrap
from PoE.tasks import pool_config


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
        raise PoEError(f"{paths.root} has no manifest.json: nothing records what its files should be (a pool of "
                       "bare files, the original release's format, loads as it is)")  # fmt: skip
    old = paths.read_manifest()
    if old.get("manifest_format") == MANIFEST_FORMAT:
        Pool(pool_config(get_dataset(dataset), paths.root), paths, "cpu")
        return f"{paths.root}: already current"
    listing = Listing(paths, old={k: v for k, v in old.items() if k not in ("library_id", "experts", "parts")})
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
    cfg = pool_config(get_dataset(dataset), paths.root)  # a pool of its own hierarchy (or folder dataset)
    Pool(cfg, paths, "cpu", contents=Contents(paths, dict(listing.digests)))  # every other check
    for path, payload in payloads.items():
        save_checkpoint(path, payload)
    save_json(paths.manifest, build(listing, listing.old))
    return f"{paths.root}: upgraded; {len(payloads)} parts now carry digests over weights and metadata"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m PoE.migrate", description=__doc__.split("\n\n")[0])
    p.add_argument("pools", nargs="+", help="pool folders (e.g. DB_PoE/cifar100) or folders holding <dataset>/")
    p.add_argument("--dataset", default="cifar100", help="the pools' dataset")
    a = p.parse_args(argv)
    try:
        cfg = get_dataset(a.dataset)
        for db in a.pools:
            print(upgrade(resolve_pool(db, cfg.name, cfg.tag), cfg.name))
    except PoEError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
