"""Pool of Experts: ``from PoE import Pool, SHIPPED_POOL; model = Pool.open(SHIPPED_POOL).query(["people"])``."""

from pathlib import Path
from typing import Any

__version__ = "1.0.0"  # the package's version (pyproject.toml reads it from here; the HTTP API reports it)

# The pool shipped in the checkout's DB_PoE/ (the package is installed editable, `pip install -e .`, or found on
# PYTHONPATH), so that examples run from any folder.
SHIPPED_POOL = Path(__file__).resolve().parent.parent / "DB_PoE"
# Two CIFAR-100 test images (32 x 32 PNG, installed with the package): test image 230, a baby; 800, a bicycle.
SAMPLES = sorted((Path(__file__).resolve().parent / "samples").glob("*.png"))

__all__ = ["SAMPLES", "SHIPPED_POOL", "Pool", "__version__"]


def __getattr__(name: str) -> Any:
    """``PoE.Pool`` on first use: importing the package (as every entry script does) must not import torch,
    or ``--help`` would wait seconds for it."""
    if name == "Pool":
        from PoE.query.pool import Pool

        return Pool
    raise AttributeError(f"module 'PoE' has no attribute {name!r}")
