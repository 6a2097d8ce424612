"""``Preprocessor``: one dataset's run as the stages see it, made of pieces with one job each."""

from __future__ import annotations

from PoE.build.preprocess.data import RunData
from PoE.build.preprocess.evaluation import Evaluator
from PoE.build.preprocess.output import PoolFiles, say
from PoE.build.preprocess.record import Report, RunRecord
from PoE.build.preprocess.settings import Settings
from PoE.core import manifest
from PoE.core.pool_paths import PoolPaths


class Preprocessor:
    """The run's settings (``s``) and folders, its images and loaders (``data``), its scoring (``scores``), its
    files (``files``: rank-0 writes of the parts), its manifest (``record``) and the ``report`` it prints."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.cfg = s.plan.cfg
        self.pool = PoolPaths(s.places.db / self.cfg.name, self.cfg.tag)
        self.pretrained = s.places.pretrained / self.cfg.name  # the Oracle, the library student, resume/ and cache/
        self.report = Report()
        self.data = RunData(s.plan, s.places.data_root, s.training, s.execution)
        self.scores = Evaluator(self.data, s.execution, s.training.test_limit, self.report)
        listing = manifest.Listing.read(self.pool)  # the pool's parts as its manifest lists them
        self.record = RunRecord(s, self.pool, listing, self.report, self.data)
        self.files = PoolFiles(self.pool, self.cfg.name, self.record, s.plan.adding)

    def making(self, parts: list[str]) -> None:
        """Record that ``parts`` are made (trained or rewritten) by this run; the first time, print the banner."""
        if not self.report.made and self.s.execution.banner:
            say(self.s.execution.banner)
        self.report.made.extend(parts)
