"""What the stages of the preprocessing phase (``PoE.build.stages``) share: the run's settings (``settings``), its
images and loaders (``data``), its scoring (``evaluation``), its files (``output``: rank-0 writes, under
torchrun), its report and manifest record (``record``), and the ``Preprocessor`` that holds them for one run.

Model selection: the final epoch of every stage is kept; the test set is only used for reporting.
"""

from PoE.build.preprocess.data import RunData, subset_index
from PoE.build.preprocess.evaluation import Evaluator
from PoE.build.preprocess.output import PoolFiles, say
from PoE.build.preprocess.preprocessor import Preprocessor
from PoE.build.preprocess.record import Report, RunRecord, StageRecord, summary
from PoE.build.preprocess.settings import Execution, Places, Plan, Settings, Training
from PoE.build.profiles import STAGES

__all__ = [
    "STAGES",
    "Evaluator",
    "Execution",
    "Places",
    "Plan",
    "PoolFiles",
    "Preprocessor",
    "Report",
    "RunData",
    "RunRecord",
    "Settings",
    "StageRecord",
    "Training",
    "say",
    "subset_index",
    "summary",
]
