"""Run_preprocessing.py: build the pool (Oracle, library, experts), resumable stage by stage. Its flags
(``parser``), the settings they make (``settings``) and what the command does with them (``body``)."""

from __future__ import annotations

from collections.abc import Sequence

from PoE.cli.common import run_main
from PoE.cli.preprocessing.body import preprocessing_body
from PoE.cli.preprocessing.parser import preprocessing_parser
from PoE.cli.preprocessing.settings import preprocessing_settings

__all__ = ["main_preprocessing", "preprocessing_body", "preprocessing_parser", "preprocessing_settings"]


def main_preprocessing(argv: Sequence[str] | None = None) -> int:
    return run_main(preprocessing_body, preprocessing_parser(), argv)
