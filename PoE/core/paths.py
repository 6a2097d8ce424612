"""The one default place of the data and of the original release, for the entry scripts, the benchmarks, the
tests and ``scripts/get_test_data.py`` alike: ``$POE_SHARED``, else ``shared/`` beside the checkout (the folder
that holds ``PoE/``). It holds ``data/`` (what ``--data_root`` reads: ``cifar100/``, ``tiny-imagenet-200/``, ...)
and ``official/`` (the original release's pools). Imports nothing heavy: ``--help`` reads it."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "POE_SHARED"
CHECKOUT = Path(__file__).resolve().parents[2]


def shared_root() -> Path:
    """``$POE_SHARED``, else ``../shared`` beside the checkout."""
    env = os.environ.get(SHARED_ENV)
    return Path(env).expanduser() if env else CHECKOUT.parent / "shared"


def default_data_root() -> Path:
    """What ``--data_root`` reads when it is not given: ``<shared>/data``."""
    return shared_root() / "data"


DATA_ROOT_HELP = f"default: ${SHARED_ENV}/data, else shared/data beside the checkout"
