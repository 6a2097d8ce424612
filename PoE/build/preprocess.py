"""What the stages of the preprocessing phase (``PoE.build.stages``) share: the run's settings, its report, and the
``Preprocessor``, which holds the training and test images, makes the loaders, evaluates, writes files (rank 0
only, under torchrun) and keeps the pool's manifest.

Model selection: the final epoch of every stage is kept; the test set is only used for reporting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.build import distributed
from PoE.build.profiles import STAGES, Profile, StageConfig
from PoE.core import manifest
from PoE.core.checkpoint import save_checkpoint, seal
from PoE.core.data import FolderLoader, ImageSet, Normalizer, TensorLoader, default_workers, file_sha256
from PoE.core.datasets import DatasetConfig
from PoE.core.errors import PoEError
from PoE.core.evaluate import accuracy
from PoE.core.pool_paths import PoolPaths
from PoE.core.runtime import Runtime
from PoE.core.tasks import Hierarchy, write_copy


@dataclass
class Settings:
    """Everything one run is told (``PoE.cli`` builds it from Run_preprocessing's flags)."""

    cfg: DatasetConfig
    profile: Profile
    oracle_arch: str
    oracle: StageConfig
    library: StageConfig
    experts: StageConfig
    T: float
    alpha: float
    teacher_views: int
    seed: int
    runtime: Runtime  # device and resolved precision
    data_root: Path
    db: Path  # pool root: the pool is db/<dataset>
    pretrained: Path  # folder of the Oracle and the library student: pretrained/<dataset>
    tasks: list[str]
    stages: tuple[str, ...] = STAGES
    retrain: tuple[str, ...] = ()
    train_limit: int | None = None  # train on a seeded random subset of this many images (smoke tests)
    test_limit: int | None = None  # score on a seeded random subset of this many test images (smoke tests)
    soft: bool = True  # ablation switches for the expert loss
    scale: bool = True
    progress: bool = True
    command: str = ""  # the command line, recorded in the manifest
    oracle_weights: Path | None = None  # pretrained datasets: the Oracle's state dict (default: torch hub cache)
    library_weights: Path | None = None  # pretrained datasets: a whole MobileNetV2's state dict (ditto)
    workers: int | None = None  # DataLoader workers of a streamed image folder (default: one per core, <= 8)
    compile: tuple[str, ...] = ()  # stages whose training step is torch.compile'd
    oracle_file: Path | None = None  # the user's Oracle program (PoE.build.oracle), used instead of training one
    oracle_classes: Path | None = None  # its class order, when it differs from the dataset's
    trust_oracle_code: bool = False  # a .pt2 or TorchScript oracle_file is code: loaded only when this says so
    library_from: Path | None = None  # a pool whose library this pool copies (a new hierarchy on a built library)
    hierarchy: Hierarchy | None = None  # the tasks of cfg, recorded in the pool's manifest
    adding: bool = False  # --add_tasks: ``tasks`` are new ones, added to the pool in place (``PoE.build.edit``)
    banner: str = ""  # printed before the first part is made (a run that only loads parts prints none)

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    def stage_seed(self, stage: str) -> int:
        """Seeds a stage's weights and batch order (augmented views are seeded by ``seed`` alone)."""
        return self.seed * 100 + STAGES.index(stage)


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


def subset_index(n: int, keep: int | None, seed: int) -> torch.Tensor | None:
    """The seeded random subset (ascending indices) of ``keep`` of ``n`` images; None (all of them) without a limit.
    ``--train_limit`` draws it with the run's seed, ``--test_limit`` with the seed + 1."""
    if not keep or keep >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:keep].sort().values


class Preprocessor:
    """One dataset's run as the stages see it: its data, loaders, evaluation, files and manifest."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.cfg = s.cfg
        self.pool = PoolPaths(s.db / s.cfg.name, s.cfg.tag)
        self.pretrained = s.pretrained / s.cfg.name  # the Oracle, the library student, resume/ and cache/
        self.normalize = Normalizer(s.cfg.mean, s.cfg.std, s.device)
        self.report = Report()
        self.listing = manifest.Listing.read(self.pool)  # the pool's parts as its manifest lists them
        self._train: ImageSet | None = None
        self._test: ImageSet | None = None
        self._train_file: Path | None = None  # the npz the training images came from (its checksum is recorded)

    # ---------------------------------------------------------------- data
    @property
    def train_set(self) -> ImageSet:
        if self._train is None:
            data, self._train_file = self.read_split("train")
            keep = self.limit(len(data), self.s.train_limit)
            self._train = data if keep is None else data.subset(keep)
        return self._train

    @property
    def test_set(self) -> ImageSet:
        if self._test is None:
            test = self.read_split("test")[0]
            keep = self.limit(len(test), self.s.test_limit, salt=1)
            self._test = test if keep is None else test.subset(keep)
        return self._test

    @property
    def task_classes(self) -> list[int]:
        """The classes of this run's tasks: all a streamed dataset's experts train and are tested on."""
        return sorted({c for t in self.s.tasks for c in self.cfg.tasks[t]})

    def check_test_limit(self) -> None:
        """Refuse, before any training or file, a ``--test_limit`` that keeps no test image of some task's classes
        (its expert's accuracy would be over none)."""
        if not self.s.test_limit:
            return
        labels = set(self.test_set.y.tolist())
        for task in self.s.tasks:
            if not labels & set(self.cfg.tasks[task]):
                raise PoEError(
                    f"--test_limit {self.s.test_limit} keeps no test image of classes "
                    f"{list(self.cfg.tasks[task])} (task {task!r}): raise it"
                )

    def limit(self, n: int, keep: int | None, salt: int = 0) -> torch.Tensor | None:
        """What ``--train_limit`` (salt 0) or ``--test_limit`` (salt 1) keeps of ``n`` images (``subset_index``); a
        limit not below ``n`` keeps all, and says so (the table's image counts would otherwise be the only sign)."""
        if keep and keep >= n and distributed.is_main():
            split = ("train", "test")[salt]
            print(f"note: --{split}_limit {keep} is not below the {n} {split} images this run reads: all are used")
        return subset_index(n, keep, self.s.seed + salt)

    def read_split(self, split: str) -> tuple[ImageSet, Path]:
        """Rank 0 reads first (decoding an image folder into the cache once); the other ranks then read the cache."""
        classes = self.task_classes if self.cfg.streamed else None
        if distributed.is_main():
            out = self.cfg.source.read(self.s.data_root, split, self.s.progress, classes)
        distributed.barrier()
        if not distributed.is_main():
            out = self.cfg.source.read(self.s.data_root, split, False, classes)
        return out

    def loader(self, stage: str, conf: StageConfig) -> TensorLoader | FolderLoader:
        """Batch order seeded per stage; augmented views seeded per run, so cached teacher views match.
        A streamed dataset (ImageNet) is decoded per batch, and only its images of this run's tasks are used."""
        shards = {"rank": distributed.rank(), "world": distributed.world(), "view_seed": self.s.seed}
        seed = self.s.stage_seed(stage)
        if self.cfg.source.train_files is not None:
            files, labels = self.cfg.source.train_files(self.s.data_root, self.task_classes)
            keep = self.limit(len(files), self.s.train_limit)
            if keep is not None:
                files, labels = [files[i] for i in keep.tolist()], [labels[i] for i in keep.tolist()]
            workers = default_workers() if self.s.workers is None else self.s.workers
            return FolderLoader(
                files,
                labels,
                conf.batch_size,
                self.normalize,
                self.cfg.image_size,
                self.s.device,
                seed,
                workers=workers,
                **shards,
            )
        return TensorLoader(
            self.train_set, conf.batch_size, self.normalize, self.cfg.crop_pad, self.s.device, seed, **shards
        )

    # ---------------------------------------------------------------- evaluation and output
    def evaluate(self, model: nn.Module, classes: list[int] | None, restrict: bool = False) -> tuple[float, int]:
        """Test accuracy (%) and image count. Several ranks each score every world-th test image and add up
        their counts, so all of them get the single-process numbers in a fraction of the time."""
        self.report.evaluated += 1
        rank, world, test = distributed.rank(), distributed.world(), self.test_set
        if world > 1:
            test = test.subset(torch.arange(rank, len(test), world))
        progress = self.s.progress and rank == 0
        acc, n = accuracy(model, test, classes, self.normalize, self.s.runtime, restrict, progress)
        if self.s.test_limit and distributed.total([n])[0] == 0:
            raise PoEError(f"--test_limit {self.s.test_limit} keeps no test image of classes {classes}: raise it")
        if world == 1:
            return acc, n
        correct, n = distributed.total([round(acc * n / 100) if n else 0, n])
        return (100.0 * correct / n if n else float("nan")), n

    def save(self, path: Path, kind: str, meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        """Rank 0 writes a finished part (a pool part is then in the listing the manifest is built from); every
        rank waits for it, so all see the same files afterwards."""
        if distributed.is_main():
            payload = seal({**meta, "kind": kind, "dataset": self.cfg.name, "state_dict": state_dict})
            save_checkpoint(path, payload)
            if self.is_pool_part(path):
                self.listing.add(path, payload)
        distributed.barrier()

    def is_pool_part(self, path: Path) -> bool:
        """Whether ``path`` is one of the files the pool's manifest lists (its library, an expert)."""
        return path == self.pool.library or path.parent == self.pool.root / "experts"

    def say(self, text: str) -> None:
        if distributed.is_main():
            print(text)

    def making(self, parts: list[str]) -> None:
        """Record that ``parts`` are made (trained or rewritten) by this run; the first time, print the banner."""
        if not self.report.made and self.s.banner:
            self.say(self.s.banner)
        self.report.made.extend(parts)

    def replace_library(self, meta: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> None:
        """Write a new library without ever showing a mixed pool: the experts of any other library go first
        (the manifest without them, then their files), then the library file, then a manifest of what is left."""
        if self.s.adding:  # an add changes nothing of what the pool holds; its library was checked when it opened
            raise PoEError(
                f"--add_tasks would replace the library of {self.pool.root}; check --pretrained (the "
                "folder the pool was built with)"
            )
        if distributed.is_main():
            old = [t for t, e in self.listing.experts.items() if e.get("library_id") != meta["id"]]
            for task in old:
                self.listing.drop(self.pool.expert(task))
            self.write_manifest()
            for task in old:
                self.pool.expert(task).unlink(missing_ok=True)
                self.say(f"[library] removed {self.pool.expert(task)}: it belongs to the previous library")
        self.save(self.pool.library, "library", meta, state_dict)
        if distributed.is_main():
            self.write_manifest()

    def adopt(self, path: Path, payload: dict[str, Any], stage: str) -> bool:
        """Whether a finished pool part read from ``path`` may be used: the manifest lists it as it is. Any
        other file (an interrupted run's, one copied in) is made again, and ``stage`` says so."""
        if self.listing.lists(path, payload):
            return True
        self.say(f"[{stage}] {path} is not the part {self.pool.manifest.name} lists: making it again")
        return False

    # ---------------------------------------------------------------- the manifest
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

    def write_manifest(self) -> None:
        """The manifest from what this run holds in memory: its settings and stage records, the run's hierarchy
        and the listing of the pool's parts (no checkpoint is read again); then ``hierarchy.json``, its readable
        copy. A run that adds tasks keeps the build's record and appends itself to ``edits``."""
        hierarchy = self.s.hierarchy or Hierarchy.of(self.cfg)
        self.listing.hierarchy = hierarchy.record(self.cfg)
        if self.s.adding:
            manifest.write(self.listing, manifest.edited(self.listing.old, self.s.command, added=list(self.s.tasks)))
        else:
            manifest.write(self.listing, self.run_record())
        write_copy(self.pool.root, hierarchy, self.cfg)

    def run_record(self) -> dict[str, Any]:
        """What the manifest says of the run: settings, stage records and times, machine."""
        old = self.listing.old
        sittings = self.per_stage(old, "sittings")
        records = {stage: r.summary for stage, r in self.report.stages.items() if r.summary is not None}
        return {
            "dataset": self.cfg.name,
            "profile": self.s.profile.name,
            "command": self.s.command,
            "settings": {
                "oracle_arch": self.s.oracle_arch,
                "oracle": repr(self.s.oracle),
                "library": repr(self.s.library),
                "experts": repr(self.s.experts),
                "T": self.s.T,
                "alpha": self.s.alpha,
                "teacher_views": self.s.teacher_views,
                "seed": self.s.seed,
                "losses": {"soft": self.s.soft, "scale": self.s.scale},
                "train_limit": self.s.train_limit,
                "test_limit": self.s.test_limit,
            },
            "train_data_sha256": file_sha256(self._train_file) if self._train_file else old.get("train_data_sha256"),
            "oracle": records.get("oracle"),
            "library": records.get("library"),
            "model_selection": "final epoch of every stage (the test set is only used for reporting)",
            "precision": self.s.runtime.precision,
            "compile": list(self.s.compile),
            "stage_epoch_seconds": self.per_stage(old, "epoch_seconds"),
            "stage_sittings": sittings,
            "resumed_stages": [stage for stage, runs in sittings.items() if len(runs) > 1],
            "machine": self.s.runtime.machine(),
            "stage_seconds": self.stage_seconds(old),
        }
