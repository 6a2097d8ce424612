#!/usr/bin/env python
"""Service phase of Pool of Experts: build a task-specific model for a query, train-free. See --help."""

import sys

from PoE.cli import main_service

if __name__ == "__main__":
    sys.exit(main_service())
