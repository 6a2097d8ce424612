"""Shared fixtures: where the real data and the original release live, and one tiny trained pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$POE_SHARED`` or ``../shared`` next to the checkout (real CIFAR-100, the original release)."""
    return Path(os.environ.get("POE_SHARED", ROOT.parent / "shared"))


def need(path: Path) -> Path:
    """Skip when a data folder is absent, unless CI says the data must be there (then fail)."""
    if not path.exists():
        if os.environ.get("POE_REQUIRE_DATA"):
            pytest.fail(f"required test data missing: {path}")
        pytest.skip(f"test data not found: {path}")
    return path


@pytest.fixture(scope="session")
def data_root() -> Path:
    need(shared_dir() / "data" / "cifar100" / "test.npz")
    return shared_dir() / "data"


@pytest.fixture(scope="session")
def official_cifar() -> Path:
    return need(shared_dir() / "official" / "cifar100")


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run an entry script in a fresh interpreter (to see exit codes and stderr exactly as a user does)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


TINY = [
    "--profile", "quick", "--oracle_arch", "wrn-10-1", "--train_limit", "1024", "--epochs", "2",
    "--teacher_views", "2", "--tasks", "people", "vehicles_1", "vehicles_2", "--no_progress", "--device", "cpu",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory, data_root) -> dict[str, Path]:
    """A pool made by a real (tiny) preprocessing run on real CIFAR-100: 1024 images, 2 epochs per stage."""
    from PoE.cli import main_preprocessing

    base = tmp_path_factory.mktemp("tiny")
    db, pre = base / "DB_PoE", base / "DB_pretrained"
    rc = main_preprocessing([*TINY, "--data_root", str(data_root), "--db", str(db), "--pretrained", str(pre)])
    assert rc == 0
    return {"db": db, "pretrained": pre, "pool": db / "cifar100"}
