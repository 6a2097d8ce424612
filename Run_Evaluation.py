#!/usr/bin/env python
"""Score a pool over every combination of n of a list of tasks (mean +- std per n). See --help."""

import sys

from PoE.cli import main_evaluation

if __name__ == "__main__":
    sys.exit(main_evaluation())
