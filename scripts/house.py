"""The package's shape in figures: module import depth, functions over 80 lines or 8 parameters, records over 15
fields, files over 400 lines, ``# fmt: skip`` lines. ``python scripts/house.py`` prints them; tests/test_house.py
holds the limits (docs/layout.md)."""

from __future__ import annotations

import argparse
import ast
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"import depth": 14, "function lines": 80, "parameters": 8, "record fields": 15, "file lines": 400}


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out = {}
    for p in sorted((root / "PoE").rglob("*.py")):
        rel = p.relative_to(root).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = p
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules ``name`` imports when it is imported (module level; TYPE_CHECKING blocks excluded):
    importing ``a.b.c`` imports ``a`` and ``a.b`` too. ``name``'s own parent packages are not counted: they are
    imported before it."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for n in [node, *(node.body if isinstance(node, ast.Try) else [])]:
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - n.level + 1] + ([base] if base else []))
                targets = [base, *(f"{base}.{a.name}" for a in n.names)]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known.keys()
    parents = name.split(".")
    return found - {name} - {".".join(parents[:i]) for i in range(1, len(parents))}


def import_depth(root: Path) -> tuple[int, list[str]]:
    """The longest chain of module-level imports inside the package, and the chain."""
    known = modules(root)
    graph = {m: imported(m, p, known) for m, p in known.items()}

    visiting: set[str] = set()

    @functools.cache
    def longest(m: str) -> tuple[int, tuple[str, ...]]:
        if m in visiting:
            raise SystemExit(f"import cycle through {m}")
        visiting.add(m)
        best: tuple[int, tuple[str, ...]] = (0, (m,))
        for d in sorted(graph[m]):
            n, chain = longest(d)
            best = max(best, (n + 1, (m, *chain)))
        visiting.discard(m)
        return best

    n, chain = max(longest(m) for m in graph)
    return n, list(chain)


def figures(root: Path) -> dict[str, list[str]]:
    """Everything over a limit, by limit: ``file:line name (value)``."""
    over: dict[str, list[str]] = {k: [] for k in LIMITS}
    for path in sorted((root / "PoE").rglob("*.py")):
        text, rel = path.read_text(), path.relative_to(root)
        if len(text.splitlines()) > LIMITS["file lines"]:
            over["file lines"].append(f"{rel} ({len(text.splitlines())})")
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef):
                a = n.args
                names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                count = len(names) - (names[:1] in (["self"], ["cls"]))
                if count > LIMITS["parameters"]:
                    over["parameters"].append(f"{rel}:{n.lineno} {n.name} ({count})")
                if n.end_lineno - n.lineno + 1 > LIMITS["function lines"]:
                    over["function lines"].append(f"{rel}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1})")
            elif isinstance(n, ast.ClassDef):
                fields = sum(isinstance(s, ast.AnnAssign) for s in n.body)
                if fields > LIMITS["record fields"]:
                    over["record fields"].append(f"{rel}:{n.lineno} {n.name} ({fields})")
    depth, chain = import_depth(root)
    if depth > LIMITS["import depth"]:
        over["import depth"].append(f"{depth}: {' -> '.join(chain)}")
    return over


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(ROOT), help="the checkout to measure (default: this one)")
    root = Path(p.parse_args().root)
    depth, chain = import_depth(root)
    skips = sum(
        bool(re.search(r"#\s*fmt:\s*skip\s*$", line))
        for f in root.rglob("*.py")
        if ".git" not in f.parts
        for line in f.read_text().splitlines()
    )
    print(f"import depth {depth} (limit {LIMITS['import depth']}): {' -> '.join(chain)}")
    print(f"'# fmt: skip' lines: {skips}")
    for limit, items in figures(root).items():
        if limit != "import depth":
            print(f"{limit} over {LIMITS[limit]}: {len(items)}" + "".join(f"\n  {i}" for i in items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
