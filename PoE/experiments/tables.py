"""The experiments' tables: Markdown as printed, and the same rows as CSV, written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np

from PoE.core.checkpoint import atomic_write

SUMMARY_COLUMNS = [
    ("n", "n"),
    ("combinations", "combinations"),
    ("acc_mean", "accuracy mean (%)"),
    ("acc_std", "std"),
    ("acc_min", "min"),
    ("acc_max", "max"),
    ("cross_expert_error_share", "cross-expert errors / errors (%)"),
    ("macs", "multiply-adds"),
    ("params", "parameters"),
]
METHOD_COLUMNS = [
    ("method", "method"),
    ("n", "n"),
    ("combinations", "combinations"),
    ("acc_mean", "accuracy (%)"),
    ("acc_std", "std"),
    ("macs", "multiply-adds"),
    ("params", "parameters"),
    ("seconds_per_query", "time per query (s)"),
]


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, heading) pairs; floats get two decimals, or two significant digits under 0.01 (PoE's
    time per query is a fraction of a millisecond: 0.00 would hide it)."""

    def cell(v: object) -> str:
        if isinstance(v, float) and 0 < abs(v) < 0.01:
            return np.format_float_positional(v, precision=2, unique=False, fractional=False)
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(cell(r[k]) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_csv(path: str | Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    fields = list(dict.fromkeys(k for r in rows for k in r))  # rows may differ in their optional keys
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_table(stem: str | Path, text: str, rows: list[dict[str, Any]]) -> None:
    """``<stem>.md`` (the table as printed) and ``<stem>.csv`` (its rows)."""
    write_text(f"{stem}.md", text + "\n")
    write_csv(f"{stem}.csv", rows)
