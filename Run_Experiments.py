#!/usr/bin/env python
"""The paper's comparisons: Oracle, PoE and baselines over composite tasks; cross-expert errors. See --help."""

import sys

from PoE.cli import main_experiments

if __name__ == "__main__":
    sys.exit(main_experiments())
