"""The preprocessing phase, stage by stage: Oracle -> library (distilled WRN front) -> experts (conditional KD).

Every stage runs one skeleton (``Stage.run``): a part whose checkpoint is finished and still fits what it was
built from (its teacher's id is recorded in it) is loaded; any other must be asked for (``--stages``), and is
then trained (resumable per epoch), evaluated, saved and reported. A dataset with a pretrained Oracle and
library (ImageNet) loads those and trains only the experts. Teacher (Oracle) outputs are computed once per
augmented view and shared by the library and all experts; all experts to be made train together in one pass
over the data, on one library forward per batch.
"""

from __future__ import annotations

import time

from PoE.build import distributed
from PoE.build.preprocess import STAGES, Preprocessor, Report, Settings
from PoE.build.stages.base import Part, Stage
from PoE.build.stages.experts import Experts
from PoE.build.stages.library import Library, PretrainedLibrary, adopt_library
from PoE.build.stages.oracle import FileOracle, Oracle, PretrainedOracle
from PoE.core.checkpoint import check_writable, save_json
from PoE.core.datasets.folder import DESCRIPTION_FILE
from PoE.core.errors import PoEError

__all__ = [
    "Experts",
    "FileOracle",
    "Library",
    "Oracle",
    "Part",
    "PretrainedLibrary",
    "PretrainedOracle",
    "Stage",
    "run",
]


def run(s: Settings) -> Report:
    """Run (or load) every stage up to the last one asked for; report all of them."""
    t0 = time.perf_counter()
    prep, plan = Preprocessor(s), s.plan
    prep.data.check_test_limit()
    if distributed.is_main():  # a read-only output folder fails now, not after the first stage trained
        for folder in (prep.pretrained, prep.pool.root):
            check_writable(folder)
        for folder in (prep.pretrained, prep.pool.root) if plan.cfg.source.description and not plan.adding else ():
            save_json(
                folder / DESCRIPTION_FILE, plan.cfg.source.description
            )  # what a folder dataset's pool was built from
    distributed.barrier()
    if s.places.library_from is not None:  # every rank: rank 0 writes, the others wait in the write
        adopt_library(s.places.library_from, prep)
    last = max(STAGES.index(st) for st in plan.stages)
    if s.places.oracle_file is not None:
        teacher = FileOracle(prep).teacher()
    else:
        teacher = (PretrainedOracle if plan.cfg.networks.pretrained else Oracle)(prep).teacher()
    if last >= 1:
        library = (PretrainedLibrary(prep) if plan.cfg.networks.pretrained else Library(prep, teacher)).run()["library"]
        if last >= 2:
            if plan.adding and library.id != prep.files.listing.library.get("id"):
                raise PoEError(
                    f"--add_tasks: the library student in {prep.pretrained} is library {library.id}, but "
                    f"the pool's is {prep.files.listing.library.get('id')}: give the --pretrained folder the "
                    "pool was built with"
                )
            Experts(prep, teacher, library).run()
        if distributed.is_main() and prep.report.made:  # every part loaded: the pool's record stays as it is
            prep.record.write()
    prep.report.teacher_cache_seconds = teacher.seconds
    prep.report.wall_seconds = time.perf_counter() - t0
    return prep.report
