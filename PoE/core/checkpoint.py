"""Checkpoints on disk: atomic writes, ``weights_only`` loads with clear errors, content ids and part digests.

Files written here wrap the weights with what they are (``{"poe_format": 2, "kind": ..., "digest": ...,
"state_dict": ...}``); the original code's files are bare state dicts. Both load the same way: the architecture is
read off the tensor shapes and checked against what the caller expects. Where a pool keeps its parts is
``pool_paths.py``.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import io
import json
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.core.errors import PoEError


def atomic_write(path: str | Path, write: Any, buffered: bool = False) -> None:
    """Call ``write(file_object)`` on a temporary file next to ``path``, then rename it into place; a failed
    write (a full disk) leaves ``path`` as it was and no temporary file, and is one PoEError naming ``path``.
    ``buffered``: ``write`` goes to memory first, for writers that abort the process when the disk refuses
    (``torch.export.save``'s C++ zip writer did: SIGABRT)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise PoEError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if buffered:
                memory = io.BytesIO()
                write(memory)
                f.write(memory.getbuffer())
            else:
                write(f)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            full = "; free some space (or write elsewhere) and run it again" if e.errno == errno.ENOSPC else ""
            raise PoEError(f"cannot write {path}: {e.strerror or e}{full}") from None
        raise


def check_writable(folder: str | Path) -> None:
    """Raise PoEError unless files can be created in ``folder``, creating nothing that is not already there:
    the folder itself, or the nearest existing folder above it, must take a file. ``os.access`` says yes for
    root on read-only mounts and on /proc, so this writes and removes a real temporary file."""
    folder = Path(folder).absolute()
    base = folder
    while not base.exists():
        base = base.parent
    try:
        if not base.is_dir():
            raise PoEError(f"cannot write into {folder}: {base} is a file")
        with tempfile.NamedTemporaryFile(dir=base, prefix=".poe-write-test.", suffix=".tmp"):
            pass
    except OSError as e:
        raise PoEError(f"cannot write into {folder}: {e.strerror or e}") from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


SHARD_BYTES = 15 << 20  # a state dict larger than this is split, so no file is over 16 MiB


def files_id(paths: list[Path]) -> str:
    """The content hash of files, names and bytes (e.g. a checkpoint and its shards): 'none' for no files."""
    if not paths:
        return "none"
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def state_id(module: nn.Module) -> str:
    """The content hash of a module's weights and buffers (16 hex digits of SHA-256): recorded as ``id`` in
    every part this project writes, checked when a pool is opened, and recorded by what is trained from it
    (an expert's ``library_id``, a cache's Oracle). It covers the weights only; ``part_digest`` covers the file."""
    return tensors_id(module.state_dict())


def tensors_id(state: Mapping[str, torch.Tensor]) -> str:
    """``state_id`` of a state dict (names and bytes)."""
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


POE_FORMAT = 2  # 2: the payload records its ``digest``; 1 (earlier versions): weights ``id`` only


def part_digest(payload: Mapping[str, Any]) -> str:
    """The hash of a whole checkpoint payload: its metadata (canonical JSON of every key but the weights,
    ``digest`` and ``poe_format``) and its tensors (name, dtype, shape, bytes). A flipped bit in a stored
    ``test_acc`` changes it as surely as one in a weight; the pool's manifest lists every part by it."""
    h = hashlib.sha256()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "digest", "state_dict_shards", "poe_format")}
    h.update(json.dumps(meta, sort_keys=True, default=repr).encode())
    state = payload.get("state_dict")
    for k, v in sorted(state.items() if isinstance(state, Mapping) else []):
        h.update(f"\0{k}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def seal(payload: Mapping[str, Any]) -> dict[str, Any]:
    """``payload`` as this version writes it: ``poe_format`` 2 and the ``digest`` over everything else."""
    out = {k: v for k, v in payload.items() if k != "digest"}
    out["poe_format"] = POE_FORMAT
    out["digest"] = part_digest(out)
    return out


def half_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module``'s state with floating-point tensors rounded to fp16 (integer buffers unchanged)."""
    return {k: (v.detach().half() if v.is_floating_point() else v).cpu() for k, v in module.state_dict().items()}


def tensor_bytes(state: Mapping[str, Any]) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))


def save_checkpoint(path: str | Path, payload: Mapping[str, Any], shard_bytes: int = SHARD_BYTES) -> None:
    """Write ``payload`` atomically. A ``state_dict`` over ``shard_bytes`` goes to shard files beside
    ``path`` (``<name>.<hash>.<i>``) written first; ``path`` itself, written last, lists them, so a reader
    never sees an index whose shards are not all there. Shards of an earlier version are then removed. Each file
    is serialised in memory first: on a full disk torch's writer fails with an opaque RuntimeError."""
    path = Path(path)
    state = payload.get("state_dict")
    shards: list[str] = []
    groups: list[dict[str, torch.Tensor]] = []
    if isinstance(state, Mapping) and tensor_bytes(state) > shard_bytes:
        groups = [{}]
        for k, v in state.items():
            if groups[-1] and tensor_bytes(groups[-1]) + tensor_bytes({k: v}) > shard_bytes:
                groups.append({})
            groups[-1][k] = v
        digest = hashlib.sha256()
        for k, v in state.items():
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        tag = digest.hexdigest()[:12]
        shards = [f"{path.name}.{tag}.{i}" for i in range(len(groups))]
        payload = {**{k: v for k, v in payload.items() if k != "state_dict"}, "state_dict_shards": shards}
    new = [path.parent / name for name in shards if not (path.parent / name).exists()]
    try:
        for name, group in zip(shards, groups, strict=True):
            atomic_write(path.parent / name, lambda f, g=group: torch.save(g, f), buffered=True)
        atomic_write(path, lambda f: torch.save(dict(payload), f), buffered=True)
    except BaseException:
        for shard in new:  # an index that failed leaves none of its shards behind
            shard.unlink(missing_ok=True)
        raise
    for old in path.parent.glob(f"{glob.escape(path.name)}.*.*"):
        if old.name not in shards and old.name.rsplit(".", 1)[-1].isdigit():
            old.unlink(missing_ok=True)


def shard_files(path: Path) -> list[Path]:
    """The shard files of a large checkpoint (``save_checkpoint``: ``<name>.<hash>.<i>``)."""
    return sorted(p for p in path.parent.glob(f"{glob.escape(path.name)}.*.*") if p.name.rsplit(".", 1)[-1].isdigit())


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()))


def file_record(path: Path) -> dict[str, Any]:
    """What a manifest records of a file, so that it is checked before anything reads it: size and SHA-256."""
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def read_recorded(path: Path, record: Mapping[str, Any], listed_in: Path) -> bytes:
    """The bytes of ``path`` if they are the ones ``listed_in`` (a manifest) records: the size is compared before
    reading (a file grown to gigabytes is never read), then the SHA-256."""
    try:
        size = path.stat().st_size
        if size != record.get("bytes"):
            raise PoEError(
                f"{path} is {size:,} bytes, but {listed_in} lists it at {record.get('bytes')} bytes: "
                "it was replaced or changed after the manifest was written; restore it, or remake "
                "it"
            )
        with open(path, "rb") as f:
            data = f.read(size + 1)
    except OSError as e:
        raise PoEError(f"cannot read {path}: {e.strerror or e}") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != record.get("sha256"):
        raise PoEError(
            f"{path} differs from the file {listed_in} lists (its SHA-256 does not match): it was replaced "
            "or changed after the manifest was written; restore it, or remake it"
        )
    return data


ZIP_SLACK = 1 << 20  # a checkpoint's zip may declare this much beyond its own size (torch stores entries uncompressed)


def check_zip_sizes(source: Path | io.BytesIO, path: Path, size: int) -> None:
    """Refuse, before anything is inflated, a zip archive that declares more bytes than a checkpoint of its size
    can hold: torch writes its entries stored, so a deflate bomb (megabytes that inflate to gigabytes) is no
    checkpoint."""
    try:
        if not zipfile.is_zipfile(source):
            return  # the original release's legacy files are pickles, not zips
        with zipfile.ZipFile(source) as z:
            declared = sum(max(0, i.file_size) for i in z.infolist())
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return  # torch.load reports it as unreadable
    finally:
        if isinstance(source, io.BytesIO):
            source.seek(0)
    if declared > 2 * size + ZIP_SLACK:
        raise PoEError(
            f"{path} is a zip archive of {size:,} bytes that declares {declared:,} bytes uncompressed (a "
            "decompression bomb, or not a checkpoint: torch stores checkpoints uncompressed); refused "
            "before loading it"
        )


def load_checkpoint(
    path: str | Path, hint: str = "", verify: Callable[[Path], bytes | None] | None = None
) -> dict[str, Any]:
    """Load with ``weights_only=True``; a missing or unreadable file raises PoEError naming it. ``verify(path)``
    returns the file's bytes once checked against a manifest (or None: not listed there), before torch reads them;
    either way a zip declaring more than a checkpoint of its size can hold is refused before it is inflated."""
    path = Path(path)
    if not path.is_file():
        raise PoEError(f"missing checkpoint {path}" + (f"; {hint}" if hint else ""))
    data = verify(path) if verify is not None else None
    source: Path | io.BytesIO = path if data is None else io.BytesIO(data)
    check_zip_sizes(source, path, len(data) if data is not None else path.stat().st_size)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of foreign files; the verdict says it
            warnings.simplefilter("ignore")
            obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file fails in many ways (struct.error, KeyError, ...): each is unreadable
        raise PoEError(f"{path} is not a readable PyTorch checkpoint: {load_failure(path, e)}") from None
    if not isinstance(obj, dict):
        raise PoEError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    shards = obj.pop("state_dict_shards", None)
    if shards is not None:
        state: dict[str, Any] = {}
        for name in shards:
            if not isinstance(name, str) or "/" in name or "\\" in name or not name.startswith(path.name + "."):
                raise PoEError(f"{path} lists a shard {name!r} outside its folder")
            part = load_checkpoint(path.parent / name, f"it is a shard of {path}", verify)
            state.update(part)
        obj["state_dict"] = state
    return obj


def load_failure(path: Path, e: BaseException) -> str:
    """Why a checkpoint did not load, in a few words of our own (torch's messages run to paragraphs and, for
    a refused pickle, advise turning the safety off)."""
    if isinstance(e, OSError):
        return f"cannot read it ({e.strerror or type(e).__name__})"
    if path.stat().st_size == 0:
        return "the file is empty (0 bytes)"
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        return "refused: it holds Python objects or code besides tensors, and checkpoints are only loaded as weights"
    if isinstance(e, EOFError | zipfile.BadZipFile) or "central directory" in text or "PytorchStreamReader" in text:
        return "truncated or not a PyTorch file"
    return f"{type(e).__name__}"


def unwrap(obj: dict[str, Any], path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, metadata) of a checkpoint of ``kind``; bare state dicts (original code) have no metadata."""
    if "poe_format" in obj:
        if "digest" in obj and part_digest(obj) != obj["digest"]:
            raise PoEError(
                f"{path}: its weights or metadata do not match the digest recorded in the file ({obj['digest']}): "
                "the file was changed or damaged; rebuild it"
            )
        if obj.get("kind") != kind:
            raise PoEError(f"{path} holds a {obj.get('kind')!r} checkpoint, expected {kind!r}")
        sd = obj.get("state_dict")
        if not isinstance(sd, dict):
            raise PoEError(f"{path} has no state_dict")
        return sd, {k: v for k, v in obj.items() if k != "state_dict"}
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PoEError(f"{path} is neither a Pool of Experts checkpoint nor a state dict")
    return obj, {}


def load_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | Path, what: str) -> nn.Module:
    """Strictly load weights, turning any key or shape mismatch into one clear line naming ``path``."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    extra = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
        if shapes:
            parts.append(f"shape mismatch {'; '.join(shapes[:2])}")
        raise PoEError(f"{path} does not match the {what} it should hold: {'; '.join(parts)}")
    module.load_state_dict(state_dict)
    return module
