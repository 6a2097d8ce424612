#!/usr/bin/env python
"""Preprocessing phase of Pool of Experts: Oracle -> library -> experts. See --help."""

import sys

from PoE.cli import main_preprocessing

if __name__ == "__main__":
    sys.exit(main_preprocessing())
