"""What a run says of itself: the report it prints (``Report``, a ``StageRecord`` per stage) and the record its
pool's manifest keeps (``RunRecord``: settings, stage records and times, machine)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from PoE.core import manifest
from PoE.core.data import file_sha256
from PoE.core.pool_paths import PoolPaths
from PoE.core.tasks import Hierarchy, write_copy

if TYPE_CHECKING:
    from PoE.build.preprocess.data import RunData
    from PoE.build.preprocess.settings import Settings


@dataclass
class StageRecord:
    """What one stage's part says of its training, for the manifest: the Oracle's and the library's from their
    metadata (trained now or loaded), the experts' from this run's training (they train together)."""

    summary: dict[str, Any] | None = None  # the Oracle's or the library's metadata as the manifest records it
    train_seconds: float | None = None
    teacher_seconds: float | None = None  # the library: computing the teacher's logits
    epoch_seconds: list[float] = field(default_factory=list)
    sittings: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, meta: dict[str, Any], **extra: Any) -> StageRecord:
        return cls(
            summary(meta) | extra,
            float(meta.get("train_seconds", 0.0)),
            meta.get("teacher_seconds"),
            list(meta.get("epoch_seconds", [])),
            list(meta.get("sittings", [])),
        )


@dataclass
class Report:
    """What the run prints at the end and records in the manifest."""

    rows: list[tuple[str, str, float, int, float]] = field(default_factory=list)  # part, scope, acc, n, sec
    stages: dict[str, StageRecord] = field(default_factory=dict)  # by stage name, as far as this run got
    teacher_cache_seconds: float = 0.0
    wall_seconds: float = 0.0
    made: list[str] = field(default_factory=list)  # parts this run trained or rewrote (none: every one was loaded)
    evaluated: int = 0  # parts scored by this run (made ones, and an --oracle file, which is scored every run)

    def add(self, part: str, scope: str, meta: dict[str, Any]) -> None:
        self.rows.append((part, scope, meta["test_acc"], meta["test_n"], meta["train_seconds"]))

    def table(self) -> str:
        head = ("part", "evaluated on", "test acc (%)", "test images", "train time (s)")
        body = [(p, s, f"{a:.2f}", str(n), f"{t:.0f}") for p, s, a, n, t in self.rows]
        widths = [max(len(r[i]) for r in [head, *body]) for i in range(5)]

        def line(r: tuple[str, ...]) -> str:
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )

        return "\n".join([line(head), "  ".join("-" * w for w in widths), *map(line, body)])


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What the manifest records of the Oracle's or the library's metadata."""
    keys = (
        "arch",
        "epochs",
        "config",
        "test_acc",
        "test_n",
        "train_seconds",
        "epoch_seconds",
        "teacher_seconds",
        "sittings",
        "stored_as",
    )
    return {k: meta[k] for k in keys if k in meta}


class RunRecord:
    """The pool's manifest as this run writes it, from what it holds in memory: its settings, the ``report``'s
    stage records and the ``listing`` of the pool's parts (no checkpoint is read again)."""

    def __init__(self, s: Settings, pool: PoolPaths, listing: manifest.Listing, report: Report, data: RunData) -> None:
        self.s, self.pool, self.listing, self.report, self.data = s, pool, listing, report, data

    def write(self) -> None:
        """The manifest, then ``hierarchy.json``, its readable copy. A run that adds tasks keeps the build's record
        and appends itself to ``edits``."""
        plan, cfg = self.s.plan, self.s.plan.cfg
        hierarchy = plan.hierarchy or Hierarchy.of(cfg)
        self.listing.hierarchy = hierarchy.record(cfg)
        if plan.adding:
            edit = manifest.edited(self.listing.old, self.s.execution.command, added=list(plan.tasks))
            manifest.write(self.listing, edit)
        else:
            manifest.write(self.listing, self.run())
        write_copy(self.pool.root, hierarchy, cfg)

    def per_stage(self, old: dict[str, Any], key: str) -> dict[str, Any]:
        """Each stage's ``key`` (``epoch_seconds``, ``sittings``) as far as this pool's files record them; a
        stage loaded from an earlier run keeps what that run's manifest said."""
        out = dict(old.get(f"stage_{key}", {}))
        for stage, record in self.report.stages.items():
            if getattr(record, key):
                out[stage] = getattr(record, key)
        return out

    def stage_seconds(self, old: dict[str, Any]) -> dict[str, float]:
        """Training seconds of each stage as its files record them, and their sum (a stage loaded from an
        earlier run keeps that run's time)."""
        out = dict(old.get("stage_seconds", {}))
        for stage, record in self.report.stages.items():
            if record.train_seconds is not None:
                out[stage] = round(record.train_seconds, 1)
            if record.teacher_seconds is not None:
                out["teacher_logits"] = round(float(record.teacher_seconds), 1)
        out.pop("total", None)
        out["total"] = round(sum(out.values()), 1)
        return out

    def settings(self) -> dict[str, Any]:
        """The training settings as the manifest records them."""
        t = self.s.training
        return {
            "oracle_arch": t.oracle_arch,
            "oracle": repr(t.oracle),
            "library": repr(t.library),
            "experts": repr(t.experts),
            "T": t.T,
            "alpha": t.alpha,
            "teacher_views": t.teacher_views,
            "seed": t.seed,
            "losses": {"soft": t.soft, "scale": t.scale},
            "train_limit": t.train_limit,
            "test_limit": t.test_limit,
        }

    def run(self) -> dict[str, Any]:
        """What the manifest says of the run: settings, stage records and times, machine."""
        old, runtime, train_file = self.listing.old, self.s.execution.runtime, self.data.train_file
        sittings = self.per_stage(old, "sittings")
        records = {stage: r.summary for stage, r in self.report.stages.items() if r.summary is not None}
        return {
            "dataset": self.s.plan.cfg.name,
            "profile": self.s.plan.profile.name,
            "command": self.s.execution.command,
            "settings": self.settings(),
            "train_data_sha256": file_sha256(train_file) if train_file else old.get("train_data_sha256"),
            "oracle": records.get("oracle"),
            "library": records.get("library"),
            "model_selection": "final epoch of every stage (the test set is only used for reporting)",
            "precision": runtime.precision,
            "compile": list(self.s.training.compile),
            "stage_epoch_seconds": self.per_stage(old, "epoch_seconds"),
            "stage_sittings": sittings,
            "resumed_stages": [stage for stage, runs in sittings.items() if len(runs) > 1],
            "machine": runtime.machine(),
            "stage_seconds": self.stage_seconds(old),
        }
