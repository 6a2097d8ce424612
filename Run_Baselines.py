#!/usr/bin/env python
"""Train the paper's baselines for a query and compare them with PoE. See --help."""

import sys

from PoE.cli import main_baselines

if __name__ == "__main__":
    sys.exit(main_baselines())
