"""Command lines of the entry scripts, one module each. ``main_*(argv)`` returns an exit code; errors are one line.

Building the parsers imports no torch (nor any module that does): ``--help`` and a bad flag answer at once, and
each command imports what it needs after parsing.
"""

from PoE.cli.baselines import main_baselines
from PoE.cli.common import Help, Parser, number, pick_device, run_main
from PoE.cli.evaluation import main_evaluation
from PoE.cli.experiments import main_experiments
from PoE.cli.preprocessing import main_preprocessing
from PoE.cli.service import main_service

__all__ = [
    "Help",
    "Parser",
    "main_baselines",
    "main_evaluation",
    "main_experiments",
    "main_preprocessing",
    "main_service",
    "number",
    "pick_device",
    "run_main",
]
