"""The one reader of every JSON file the project reads (hierarchies, ``manifest.json``, ``dataset.json``, the
baselines' record): a regular file of bounded size, nested to a bounded depth, or a one-line ``PoEError`` that
names the file and what is accepted. Python's parser recurses once per level (a file nested 1,500 deep ends in a
RecursionError) and ``read_text`` reads a FIFO or ``/dev/zero`` without end, so neither sees a user's file
unchecked."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PoE.core.errors import PoEError

MAX_JSON_BYTES = 32 * 2**20  # a manifest takes under 1 KB per task: tens of thousands of tasks fit
MAX_JSON_DEPTH = 64  # the project's files nest 5 levels at most
STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')  # possessive: no backtracking on an unclosed string
BRACKETS = str.maketrans("[]{}", "()()")
KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)
Hook = Callable[[list[tuple[str, Any]]], Any]


def file_kind(mode: int) -> str:
    return next((name for test, name in KINDS if test(mode)), "not a regular file")


def read_text(path: str | Path, what: str = "", expected: str = "", max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of the regular file ``path``, at most ``max_bytes``; anything else is one line naming it
    (``what``: how the message names it, e.g. ``hierarchy``; ``expected``: what is accepted). It is opened
    without blocking, so a FIFO is refused rather than waited on."""
    label = f"{what} {path}" if what else str(path)
    tail = f"; expected {expected}" if expected else ""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PoEError(f"{label}: no such file{tail}") from None
    except OSError as e:
        raise PoEError(f"{label}: cannot read it ({e.strerror or e}){tail}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PoEError(f"{label}: {file_kind(info.st_mode)}, not a regular file{tail}")
        if info.st_size > max_bytes:
            raise PoEError(f"{label}: {info.st_size:,} bytes, over the limit of {max_bytes:,} for this file{tail}")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise PoEError(f"{label}: cannot read it ({e.strerror or e}){tail}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise PoEError(f"{label}: grew past the limit of {max_bytes:,} bytes while read{tail}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PoEError(f"{label}: not UTF-8 text (byte {e.start}){tail}") from None


def nesting_over(text: str, max_depth: int) -> bool:
    """Whether the JSON ``text`` nests deeper than ``max_depth``, without recursion: strings dropped, brackets
    kept, then the innermost pairs removed once per level (C-speed passes, at most ``max_depth + 1``)."""
    brackets = re.sub(r"[^\[\]{}]+", "", STRING.sub("", text)).translate(BRACKETS)
    for _ in range(max_depth):
        if "()" not in brackets:
            return False
        brackets = brackets.replace("()", "")
    return "()" in brackets


def parse_json(
    text: str, label: str, expected: str = "", max_depth: int = MAX_JSON_DEPTH, hook: Hook | None = None
) -> Any:
    """``text`` parsed (``hook``: json's ``object_pairs_hook``; a ``PoEError`` it raises is prefixed with
    ``label``), else one line ``<label>: <what is wrong>; expected <expected>``."""
    tail = f"; expected {expected}" if expected else ""
    if nesting_over(text, max_depth):
        raise PoEError(f"{label}: nested deeper than {max_depth} levels{tail}")
    try:
        return json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as e:
        raise PoEError(f"{label}: not JSON ({e.msg} at line {e.lineno} column {e.colno}){tail}") from None
    except RecursionError:  # a deeper stack than the check assumes; never reached with the default depth
        raise PoEError(f"{label}: nested too deeply to read{tail}") from None
    except PoEError as e:
        raise PoEError(f"{label}: {e}") from None


def read_json(
    path: str | Path,
    what: str = "",
    expected: str = "",
    *,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    hook: Hook | None = None,
) -> Any:
    """The JSON value in the file ``path``, read by ``read_text`` and parsed by ``parse_json``."""
    text = read_text(path, what, expected, max_bytes)
    return parse_json(text, f"{what} {path}" if what else str(path), expected, max_depth, hook)
