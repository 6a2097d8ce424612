"""The README's Python example, run verbatim from another folder (it must need nothing but the package)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def readme_python_example() -> str:
    """The README's first ```python block: the Python API's example."""
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    assert blocks, "README.md has no ```python block"
    assert "Pool.open(" in blocks[0], "README.md's first ```python block is not the Python API's example"
    return blocks[0]


def test_readme_python_example_runs_verbatim_from_another_folder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # as `pip install -e .` would make it importable
    r = subprocess.run(
        [sys.executable, "-c", readme_python_example()],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("['baby', 'bicycle'] [{'id': 8, 'name': 'bicycle'"), r.stdout  # both samples right
    assert (tmp_path / "people_vehicles.pt2").stat().st_size > 10_000
