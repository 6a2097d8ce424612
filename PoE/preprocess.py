"""The preprocessing phase: Oracle -> library (distilled WRN front) -> experts (conditional KD).

Each stage is loaded when its checkpoint exists and still fits what it was built from (its
teacher's id is recorded in it), and trained otherwise. Training is resumable per epoch. Teacher
(Oracle) outputs are computed once per augmented view and shared by the library and all experts;
all requested experts train together in one pass over the data, on one library forward per batch.
Model selection: the final epoch of every stage is kept; the test set is only used for reporting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from PoE import distributed
from PoE.config import DatasetConfig, Profile, StageConfig
from PoE.data import (
    Batch,
    FolderLoader,
    ImageSet,
    Normalizer,
    TensorLoader,
    default_workers,
    file_sha256,
    folder_listing,
    load_split_file,
)
from PoE.errors import PoEError
from PoE.evaluate import accuracy
from PoE.losses import ckd_loss, kd_loss
from PoE.networks import WideResNet, WRNExpert, build_network, new_expert
from PoE.networks.mobilenetv2 import MobileNetLibrary, library_state
from PoE.networks.pretrained import imagenet_weights
from PoE.precision import autocast, machine_info
from PoE.store import (
    PoolPaths,
    check_writable,
    half_state,
    load_checkpoint,
    load_into,
    save_checkpoint,
    save_json,
    state_id,
    unwrap,
)
from PoE.train import compiled, seed_everything, train_stage

STAGES = ("oracle", "library", "experts")


@dataclass
class Settings:
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
    device: torch.device
    data_root: Path
    db: Path  # pool root: the pool is db/<dataset>
    pretrained: Path  # db of Oracle / library student: db/<dataset>
    tasks: list[str]
    stages: tuple[str, ...] = STAGES
    retrain: tuple[str, ...] = ()
    train_limit: int | None = None  # train on a seeded random subset of this many images (smoke tests)
    soft: bool = True  # ablation switches for the expert loss
    scale: bool = True
    progress: bool = True
    command: str = ""  # the command line, recorded in the manifest
    oracle_weights: Path | None = None  # pretrained datasets: the Oracle's state dict (default: torch hub cache)
    library_weights: Path | None = None  # pretrained datasets: a whole MobileNetV2's state dict (ditto)
    workers: int | None = None  # DataLoader workers of a streamed image folder (default: one per core, <= 8)
    precision: str = "fp32"  # fp32 or bf16 (resolved from --precision)
    compile: tuple[str, ...] = ()  # stages whose training step is torch.compile'd

    def stage_seed(self, stage: str) -> int:
        return self.seed * 100 + STAGES.index(stage)


class TeacherOutputs:
    """The Oracle's logits for training batches, cached per augmented view when ``views`` > 0.

    Epoch ``e`` of a later stage uses view ``e % views``; each view's logits (fp16, N x classes) are
    computed once in eval mode, saved under ``cache_dir`` and reused by every stage and expert. The
    tables stay on the device that holds the training images, so a lookup is one gather there.
    With ``views`` = 0 the Oracle runs on every batch instead (a fresh augmentation every epoch).
    """

    def __init__(
        self,
        oracle: nn.Module,
        oracle_id: str,
        views: int,
        view_seed: int,
        cache_dir: Path,
        progress: bool,
        precision: str = "fp32",
    ) -> None:
        self.oracle, self.oracle_id, self.views, self.view_seed = oracle.eval(), oracle_id, views, view_seed
        self.cache_dir, self.progress, self.precision = cache_dir, progress, precision
        self.tables: dict[int, torch.Tensor] = {}
        self.seconds = 0.0

    def batches(self, loader: TensorLoader, stage: StageConfig) -> Callable[[int], Iterator[Batch]]:
        """Epoch -> batches of ``loader``, drawn from the views whose logits this object serves. The views the
        stage will use are made ready first, so no epoch stops to run the Oracle (and epoch times are
        training alone)."""
        assert loader.view_seed == self.view_seed
        for view in range(min(self.views, stage.epochs)):
            self.table(view, loader)
        return lambda epoch: loader.epoch(epoch, epoch % self.views if self.views else epoch)

    def table(self, view: int, loader: TensorLoader) -> torch.Tensor:
        """One view's logits, on the device that holds ``loader``'s images."""
        if view not in self.tables:
            self.tables[view] = self.load_view(view, loader).to(loader.data.x.device)
        return self.tables[view]

    @torch.no_grad()
    def logits(self, batch: Batch, loader: TensorLoader) -> torch.Tensor:
        if not self.views:
            return self.oracle(batch.x).float()
        return self.table(batch.view, loader)[batch.index].float()

    @torch.no_grad()
    def load_view(self, view: int, loader: TensorLoader) -> torch.Tensor:
        """One view's table: rank 0 reads it from the cache or computes and writes it; the other ranks
        wait for that and read the file (every rank calls this at the same batches, all views alike)."""
        n = len(loader.data)
        path = self.cache_dir / f"teacher_{self.oracle_id}_seed{self.view_seed}_n{n}_{self.precision}_view{view:04d}.pt"
        table = None
        if distributed.is_main():
            table = self.cached(path, n)
            if table is None:
                table = self.compute(view, loader)
                save_checkpoint(path, {"logits": table.cpu()})
        distributed.barrier()
        if table is None:
            table = self.cached(path, n)
            if table is None:
                raise PoEError(f"{path}: teacher logits missing or unreadable after rank 0 wrote them")
        return table

    @staticmethod
    def cached(path: Path, n: int) -> torch.Tensor | None:
        if path.exists():
            table = load_checkpoint(path).get("logits")
            if isinstance(table, torch.Tensor) and table.shape[0] == n:
                return table
        return None

    @torch.no_grad()
    def compute(self, view: int, loader: TensorLoader) -> torch.Tensor:
        t0 = time.perf_counter()
        parts = []
        steps = -(-len(loader.data) // 500)
        batches = loader.ordered(view, 500)
        with torch.autocast(loader.device.type, enabled=False):  # called from inside a training step's autocast
            for batch in tqdm(
                batches, total=steps, desc=f"teacher view {view}", leave=False, disable=not self.progress
            ):
                with autocast(batch.x.device, self.precision):
                    logits = self.oracle(batch.x)
                parts.append(logits.half())
            table = torch.cat(parts)
        if table.is_cuda:
            torch.cuda.synchronize(table.device)
        self.seconds += time.perf_counter() - t0
        return table


@dataclass
class Report:
    """What the run prints at the end and records in the manifest."""

    rows: list[tuple[str, str, float, int, float]] = field(default_factory=list)  # part, scope, acc, n, sec
    info: dict[str, Any] = field(default_factory=dict)

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
    keys = ("arch", "epochs", "config", "test_acc", "test_n", "train_seconds", "epoch_seconds", "teacher_seconds",
            "stored_as")  # fmt: skip
    return {k: meta[k] for k in keys if k in meta}


class ExpertHeads(nn.ModuleList):
    """The experts trained together, as one module: one DDP wrapper averages all their gradients at once."""

    def forward(self, features: torch.Tensor) -> list[torch.Tensor]:
        return [e(features) for e in self]


class Preprocessor:
    """Runs the requested stages for one dataset; earlier stages are loaded (or trained if asked)."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.cfg = s.cfg
        self.pool = PoolPaths(s.db / s.cfg.name, s.cfg.tag)
        self.pre = s.pretrained / s.cfg.name
        self.normalize = Normalizer(s.cfg.mean, s.cfg.std, s.device)
        self.report = Report()
        self._train: ImageSet | None = None
        self._test: ImageSet | None = None
        self._train_file: Path | None = None  # the npz the training images came from (its checksum is recorded)
        self.teacher: TeacherOutputs | None = None

    # ---------------------------------------------------------------- helpers
    @property
    def train_set(self) -> ImageSet:
        if self._train is None:
            data, self._train_file = self.read_split("train")
            if self.s.train_limit and self.s.train_limit < len(data):
                g = torch.Generator().manual_seed(self.s.seed)
                data = data.subset(torch.randperm(len(data), generator=g)[: self.s.train_limit].sort().values)
            self._train = data
        return self._train

    @property
    def test_set(self) -> ImageSet:
        if self._test is None:
            self._test = self.read_split("test")[0]
        return self._test

    @property
    def task_classes(self) -> list[int]:
        """The classes of this run's tasks: all an image folder's experts train and are tested on."""
        return sorted({c for t in self.s.tasks for c in self.cfg.tasks[t]})

    def read_split(self, split: str) -> tuple[ImageSet, Path]:
        """Rank 0 reads first (decoding an image folder into the cache once); the other ranks then read the cache."""
        classes = self.task_classes if self.cfg.reader == "imagefolder" else None
        if distributed.is_main():
            out = load_split_file(self.cfg.name, self.s.data_root, split, self.s.progress, classes)
        distributed.barrier()
        if not distributed.is_main():
            out = load_split_file(self.cfg.name, self.s.data_root, split, False, classes)
        return out

    def loader(self, stage: str, conf: StageConfig) -> TensorLoader | FolderLoader:
        """Batch order seeded per stage; augmented views seeded per run, so cached teacher views match.
        An image folder (ImageNet) is streamed, and only its images of this run's tasks are used."""
        if self.cfg.reader == "imagefolder":
            files, labels = folder_listing(
                self.s.data_root / self.cfg.folder, "train", self.cfg.num_classes, self.task_classes
            )
            if self.s.train_limit and self.s.train_limit < len(files):
                g = torch.Generator().manual_seed(self.s.seed)
                keep = torch.randperm(len(files), generator=g)[: self.s.train_limit].sort().values.tolist()
                files, labels = [files[i] for i in keep], [labels[i] for i in keep]
            return FolderLoader(
                files,
                labels,
                conf.batch_size,
                self.normalize,
                self.cfg.image_size,
                self.s.device,
                self.s.stage_seed(stage),
                rank=distributed.rank(),
                world=distributed.world(),
                workers=default_workers() if self.s.workers is None else self.s.workers,
                view_seed=self.s.seed,
            )
        return TensorLoader(
            self.train_set,
            conf.batch_size,
            self.normalize,
            self.cfg.crop_pad,
            self.s.device,
            self.s.stage_seed(stage),
            rank=distributed.rank(),
            world=distributed.world(),
            view_seed=self.s.seed,
        )

    def evaluate(self, model: nn.Module, classes: list[int] | None, restrict: bool = False) -> tuple[float, int]:
        """Test accuracy (%) and image count. Several ranks each score every world-th test image and add up
        their counts, so all of them get the single-process numbers in a fraction of the time."""
        rank, world, test = distributed.rank(), distributed.world(), self.test_set
        if world > 1:
            test = test.subset(torch.arange(rank, len(test), world))
        progress = self.s.progress and rank == 0
        acc, n = accuracy(model, test, classes, self.normalize, self.s.device, restrict, progress, self.s.precision)
        if world == 1:
            return acc, n
        correct, n = distributed.total([round(acc * n / 100) if n else 0, n])
        return (100.0 * correct / n if n else float("nan")), n

    def save(self, path: Path, payload: dict[str, Any]) -> None:
        """Rank 0 writes a finished part; every rank waits for it, so all see the same files afterwards."""
        if distributed.is_main():
            save_checkpoint(path, payload)
        distributed.barrier()

    def say(self, text: str) -> None:
        if distributed.is_main():
            print(text)

    def train(
        self,
        stage: str,
        modules: dict[str, nn.Module],
        loss_fn: Callable[[Batch], torch.Tensor],
        loader: TensorLoader,
        batches: Callable[[int], Iterator[Batch]],
        fingerprint: dict[str, Any],
        frozen: tuple[nn.Module, ...] = (),
    ) -> dict[str, Any]:
        resume = self.pre / "resume" / f"{stage}.pt"
        if stage in self.s.retrain and distributed.is_main():
            resume.unlink(missing_ok=True)
        distributed.barrier()  # no rank reads a resume file rank 0 is about to drop
        conf = getattr(self.s, stage)
        fingerprint = {
            "stage": stage,
            "dataset": self.cfg.name,
            "seed": self.s.seed,
            "config": repr(conf),
            "train_limit": self.s.train_limit,
            **fingerprint,
        }
        history = train_stage(
            stage,
            modules,
            loss_fn,
            batches,
            len(loader),
            conf,
            resume,
            fingerprint,
            frozen,
            progress=self.s.progress,
            precision=self.s.precision,
        )
        if distributed.is_main():
            resume.unlink(missing_ok=True)
        return {
            "epochs": conf.epochs,
            "config": repr(conf),
            "seed": self.s.seed,
            "train_seconds": history["seconds"],
            "epoch_seconds": history.get("epoch_seconds", []),
        }

    def replace_library(self, path: Path, payload: dict[str, Any]) -> None:
        """Write a new library without ever showing a mixed pool: the experts of any other library go first
        (and the manifest with them), then the library file, then a manifest of what is left."""
        if distributed.is_main():
            for task, meta in self.expert_metas().items():
                if meta.get("library_id") != payload["id"]:
                    self.pool.expert(task).unlink(missing_ok=True)
                    self.say(f"[library] removed {self.pool.expert(task)}: it belongs to the previous library")
            self.write_manifest()
        self.save(path, payload)
        if distributed.is_main():
            self.write_manifest()

    def library_id(self) -> str | None:
        if not self.pool.library.exists():
            return None
        try:
            return unwrap(load_checkpoint(self.pool.library), self.pool.library, "library")[1].get("id")
        except PoEError:
            return None

    def expert_metas(self) -> dict[str, dict[str, Any]]:
        """Metadata of every readable expert file of the pool (a damaged file is left for the service's
        checks to report; a bare state dict has empty metadata)."""
        out = {}
        for task in self.pool.experts_present():
            try:
                out[task] = unwrap(load_checkpoint(self.pool.expert(task)), self.pool.expert(task), "expert")[1]
            except PoEError:
                out[task] = {}
        return out

    def existing(self, stage: str, path: Path, kind: str) -> tuple[dict, dict] | None:
        """(state_dict, meta) of a finished stage's checkpoint, or None when it must be (re)trained."""
        if stage in self.s.retrain or not path.exists():
            return None
        return unwrap(load_checkpoint(path), path, kind)

    def missing(self, path: Path, stage: str, extra: str = "") -> PoEError:
        return PoEError(
            f"missing {path}; make it with: python Run_preprocessing.py --dataset {self.cfg.name} "
            f"--stages {stage}{extra}"
        )

    # ---------------------------------------------------------------- Oracle
    def oracle(self) -> tuple[nn.Module, str]:
        if self.cfg.pretrained:
            return self.pretrained_oracle()
        path = self.pre / "oracle.pt"
        arch = self.s.oracle_arch
        found = self.existing("oracle", path, "oracle")
        if found is not None:
            sd, meta = found
            if meta.get("arch") != arch and "oracle" in self.s.stages:
                raise PoEError(
                    f"{path} holds a {meta.get('arch')} Oracle but this run asks for {arch}; pass "
                    f"--retrain oracle to replace it, or --oracle_arch {meta.get('arch')}"
                )
            arch = str(meta.get("arch"))
            model = load_into(build_network(arch, self.cfg), sd, path, f"{arch} Oracle")
        else:
            if "oracle" not in self.s.stages:
                raise self.missing(path, "oracle")
            conf = self.s.oracle
            seed_everything(self.s.stage_seed("oracle"))
            model = build_network(arch, self.cfg).to(self.s.device).to(memory_format=torch.channels_last)
            loader = self.loader("oracle", conf)
            net = compiled(distributed.wrap(model), "oracle" in self.s.compile)

            def loss_fn(b: Batch) -> torch.Tensor:
                return F.cross_entropy(net(b.x).float(), b.y, label_smoothing=conf.label_smoothing)

            meta = {
                "arch": arch,
                **self.train("oracle", {"oracle": model}, loss_fn, loader, loader.epoch, {"arch": arch}),
            }
            # kept at fp16: half the file, and the stored Oracle is exactly the one measured and distilled
            model.load_state_dict(half_state(model))
            meta["stored_as"] = "fp16"
            meta["test_acc"], meta["test_n"] = self.evaluate(model, None)
            meta["id"] = state_id(model)
            self.save(
                path,
                {"poe_format": 1, "kind": "oracle", "dataset": self.cfg.name, **meta, "state_dict": half_state(model)},
            )
        self.report.add(f"Oracle ({arch})", "all classes", meta)
        self.report.info["oracle"] = summary(meta)
        model = model.to(self.s.device).to(memory_format=torch.channels_last).eval()
        self.teacher = TeacherOutputs(
            model,
            str(meta["id"]),
            self.s.teacher_views,
            self.s.seed,
            self.pre / "cache",
            self.s.progress,
            self.s.precision,
        )
        return model, str(meta["id"])

    def pretrained_oracle(self) -> tuple[nn.Module, str]:
        """A torchvision Oracle with its ImageNet weights (a file or the hub cache); nothing is trained. It is
        scored on this run's tasks' test images, its argmax restricted to their classes (as the paper's table)."""
        arch = self.s.oracle_arch
        sd, source = imagenet_weights(arch, self.s.oracle_weights, "--oracle_weights")
        model = load_into(build_network(arch, self.cfg), sd, source, f"{arch} Oracle")
        model = model.to(self.s.device).to(memory_format=torch.channels_last).eval()
        meta: dict[str, Any] = {"arch": arch, "weights": str(source), "train_seconds": 0.0, "id": state_id(model)}
        meta["test_acc"], meta["test_n"] = self.evaluate(model, self.task_classes, restrict=True)
        self.report.add(f"Oracle ({arch}, pretrained)", "the tasks' classes", meta)
        self.report.info["oracle"] = summary(meta) | {"weights": str(source)}
        self.teacher = TeacherOutputs(
            model, meta["id"], 0, self.s.seed, self.pre / "cache", self.s.progress, self.s.precision
        )
        return model, meta["id"]

    # ---------------------------------------------------------------- library
    def pretrained_library(self) -> tuple[MobileNetLibrary, str]:
        """The front of torchvision's ImageNet MobileNetV2 (features[:18]) as the library: not distilled.
        Written to the pool once; later runs load the pool's copy (``--retrain library`` replaces it)."""
        lib_path = self.pool.library
        found = self.existing("library", lib_path, "library")
        if found is not None:
            sd, meta = found
            library = load_into(MobileNetLibrary(), sd, lib_path, f"{self.cfg.name} library")
        else:
            if "library" not in self.s.stages:
                raise self.missing(lib_path, "library")
            full, source = imagenet_weights(self.cfg.library_arch, self.s.library_weights, "--library_weights")
            library = MobileNetLibrary()
            load_into(library, library_state(full), source, f"{self.cfg.library_arch} front (features[:18])")
            meta = {"arch": f"{self.cfg.library_arch} features[:18]", "weights": str(source), "train_seconds": 0.0}
            meta["id"] = state_id(library)
            payload = {"poe_format": 1, "kind": "library", "dataset": self.cfg.name, **meta}
            self.replace_library(lib_path, {**payload, "state_dict": library.state_dict()})
        self.report.add(
            f"library ({meta.get('arch')}, pretrained)",
            "not scored alone",
            {**meta, "test_acc": float("nan"), "test_n": 0},
        )
        self.report.info["library"] = summary(meta) | {"weights": meta.get("weights")}
        return library.to(self.s.device).eval(), str(meta["id"])

    def library(self, oracle_id: str) -> tuple[WideResNet, str]:
        path, lib_path = self.pre / "library_student.pt", self.pool.library
        arch = self.cfg.library_arch
        found = self.existing("library", path, "library_student") if lib_path.exists() else None
        if found is not None and found[1].get("oracle_id") != oracle_id:
            if "library" not in self.s.stages:
                raise PoEError(
                    f"{path} was distilled from another Oracle than {self.pre / 'oracle.pt'}; "
                    "run --stages library again"
                )
            self.say(f"[library] {path} was distilled from another Oracle: retraining it")
            found = None
        if found is not None:
            sd, meta = found
            student = load_into(build_network(arch, self.cfg), sd, path, f"{arch} library student")
        else:
            if "library" not in self.s.stages:
                raise self.missing(lib_path, "library")
            teacher, conf, T = self.teacher, self.s.library, self.s.T
            assert teacher is not None
            seed_everything(self.s.stage_seed("library"))
            student = build_network(arch, self.cfg).to(self.s.device).to(memory_format=torch.channels_last)
            loader = self.loader("library", conf)
            net = compiled(distributed.wrap(student), "library" in self.s.compile)

            def loss_fn(b: Batch) -> torch.Tensor:
                return kd_loss(net(b.x), teacher.logits(b, loader), T)

            fp = {"arch": arch, "oracle": oracle_id, "T": T, "views": self.s.teacher_views}
            meta = {
                "arch": arch,
                **self.train("library", {"student": student}, loss_fn, loader, teacher.batches(loader, conf), fp),
            }
            meta["test_acc"], meta["test_n"] = self.evaluate(student, None)
            meta.update(
                T=T,
                teacher_views=self.s.teacher_views,
                oracle_id=oracle_id,
                id=state_id(student.front),
                teacher_seconds=teacher.seconds,
            )
            base = {"poe_format": 1, "dataset": self.cfg.name, **meta}
            self.save(path, {**base, "kind": "library_student", "state_dict": student.state_dict()})
            self.replace_library(lib_path, {**base, "kind": "library", "state_dict": student.front.state_dict()})
        self.report.add(f"library student ({arch})", "all classes", meta)
        self.report.info["library"] = summary(meta)
        return student.to(self.s.device).eval(), str(meta["id"])

    # ---------------------------------------------------------------- experts
    def experts(self, library: nn.Module, lib_id: str) -> dict[str, WRNExpert]:
        library.eval()
        for p in library.parameters():
            p.requires_grad_(False)
        done: dict[str, WRNExpert] = {}
        metas: dict[str, dict] = {}
        todo: list[str] = []
        for task in self.s.tasks:
            path = self.pool.expert(task)
            found = self.existing("experts", path, "expert")
            if found is not None and found[1].get("library_id") != lib_id:
                self.say(f"[experts] {path} was trained on another library: retraining it")
                found = None
            teacher_id = self.teacher.oracle_id if self.teacher is not None else None
            if self.cfg.pretrained and found is not None and found[1].get("oracle_id") != teacher_id:
                # a pretrained library does not change with the Oracle: check the Oracle itself
                self.say(f"[experts] {path} was distilled from another Oracle: retraining it")
                found = None
            if found is None:
                todo.append(task)
                continue
            e = new_expert(library, self.cfg.expert_width, len(self.cfg.tasks[task]))
            done[task] = load_into(e, found[0], path, f"expert of {task!r}").to(self.s.device)
            metas[task] = found[1]
        if todo and "experts" not in self.s.stages:
            raise self.missing(self.pool.expert(todo[0]), "experts", " --tasks " + " ".join(todo))
        if todo:
            trained, new_metas = self.train_experts(todo, library, lib_id)
            done.update(trained)
            metas.update(new_metas)
        for task in self.s.tasks:
            self.report.add(f"expert {task}", "its task's classes", metas[task])
        return done

    def train_experts(self, tasks: list[str], library: nn.Module, lib_id: str) -> tuple[dict, dict]:
        teacher, conf = self.teacher, self.s.experts
        assert teacher is not None
        seed_everything(self.s.stage_seed("experts"))
        experts = {}
        for t in tasks:
            e = new_expert(library, self.cfg.expert_width, len(self.cfg.tasks[t]))
            experts[t] = e.to(self.s.device).to(memory_format=torch.channels_last)
        cols = {t: torch.tensor(self.cfg.tasks[t], device=self.s.device) for t in tasks}
        T, alpha, soft, scale = self.s.T, self.s.alpha, self.s.soft, self.s.scale
        loader = self.loader("experts", conf)
        heads = compiled(distributed.wrap(ExpertHeads(experts.values())), "experts" in self.s.compile)

        def loss_fn(b: Batch) -> torch.Tensor:
            with torch.no_grad():  # one library forward and one teacher lookup serve every expert
                features = library(b.x)
                t_all = teacher.logits(b, loader)
            outs = heads(features)
            losses = [ckd_loss(o, t_all[:, cols[t]], T, alpha, soft, scale) for t, o in zip(experts, outs, strict=True)]
            return torch.stack(losses).sum()

        fp = {
            "tasks": tasks,
            "library": lib_id,
            "oracle": teacher.oracle_id,
            "T": T,
            "alpha": alpha,
            "soft": soft,
            "scale": scale,
            "views": self.s.teacher_views,
        }
        batches = teacher.batches(loader, conf)
        run = self.train("experts", dict(experts), loss_fn, loader, batches, fp, frozen=(library,))
        self.report.info["experts_seconds"] = run["train_seconds"]
        self.report.info["experts_epoch_seconds"] = run.pop("epoch_seconds")
        run["train_seconds"] /= len(tasks)
        metas = {}
        for t, e in experts.items():
            e.eval()
            meta = {
                "task": t,
                "classes": self.cfg.tasks[t],
                **run,
                "T": T,
                "alpha": alpha,
                "trained_with": len(tasks),
                "losses": {"soft": soft, "scale": scale},
                "library_id": lib_id,
                "oracle_id": teacher.oracle_id,
            }
            meta["test_acc"], meta["test_n"] = self.evaluate(nn.Sequential(library, e), self.cfg.tasks[t])
            meta["id"] = state_id(e)
            self.save(
                self.pool.expert(t),
                {"poe_format": 1, "kind": "expert", "dataset": self.cfg.name, **meta, "state_dict": e.state_dict()},
            )
            metas[t] = meta
        return experts, metas

    # ---------------------------------------------------------------- run
    def run(self) -> Report:
        """Run (or load) every stage up to the last one asked for; report all of them."""
        t0 = time.perf_counter()
        if distributed.is_main():  # a read-only output folder fails now, not after the first stage trained
            for folder in (self.pre, self.pool.root):
                check_writable(folder)
        last = max(STAGES.index(st) for st in self.s.stages)
        _, oracle_id = self.oracle()
        if last >= 1:
            if self.cfg.pretrained:
                library, lib_id = self.pretrained_library()
            else:
                student, lib_id = self.library(oracle_id)
                library = student.front
            if last >= 2:
                self.experts(library, lib_id)
            if distributed.is_main():
                self.write_manifest()
        assert self.teacher is not None
        self.report.info["teacher_cache_seconds"] = self.teacher.seconds
        self.report.info["wall_seconds"] = time.perf_counter() - t0
        return self.report

    def epoch_seconds(self, old: dict[str, Any]) -> dict[str, list[float]]:
        """Each stage's per-epoch training seconds, as far as this pool's files record them."""
        out = dict(old.get("stage_epoch_seconds", {}))
        for stage in ("oracle", "library"):
            if self.report.info.get(stage, {}).get("epoch_seconds"):
                out[stage] = self.report.info[stage]["epoch_seconds"]
        if "experts_epoch_seconds" in self.report.info:
            out["experts"] = self.report.info["experts_epoch_seconds"]
        return out

    def stage_seconds(self, old: dict[str, Any]) -> dict[str, float]:
        """Training seconds of each stage as its files record them, and their sum (a stage loaded from an
        earlier run keeps that run's time)."""
        info = self.report.info
        out = dict(old.get("stage_seconds", {}))
        for stage in ("oracle", "library"):
            if info.get(stage):
                out[stage] = round(float(info[stage].get("train_seconds", 0.0)), 1)
        if info.get("library", {}).get("teacher_seconds") is not None:
            out["teacher_logits"] = round(float(info["library"]["teacher_seconds"]), 1)
        if "experts_seconds" in info:
            out["experts"] = round(float(info["experts_seconds"]), 1)
        out.pop("total", None)
        out["total"] = round(sum(out.values()), 1)
        return out

    def write_manifest(self) -> None:
        try:
            old = self.pool.read_manifest()
        except PoEError:
            old = {}
        experts = {}
        for t, meta in self.expert_metas().items():  # what the files are, not what this run did
            experts[t] = {k: meta.get(k) for k in ("classes", "test_acc", "test_n", "train_seconds", "epochs", "id",
                                                   "library_id")}  # fmt: skip
        manifest = {
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
            },
            "train_data_sha256": file_sha256(self._train_file) if self._train_file else old.get("train_data_sha256"),
            "oracle": self.report.info.get("oracle"),
            "library": self.report.info.get("library"),
            "library_id": self.library_id(),
            "experts": dict(sorted(experts.items())),
            "model_selection": "final epoch of every stage (the test set is only used for reporting)",
            "precision": self.s.precision,
            "compile": list(self.s.compile),
            "stage_epoch_seconds": self.epoch_seconds(old),
            "machine": machine_info(self.s.device),
            "stage_seconds": self.stage_seconds(old),
        }
        save_json(self.pool.manifest, manifest)
