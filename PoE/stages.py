"""The preprocessing phase, stage by stage: Oracle -> library (distilled WRN front) -> experts (conditional KD).

Every stage runs one skeleton (``Stage.run``): a part whose checkpoint is finished and still fits what it was
built from (its teacher's id is recorded in it) is loaded; any other must be asked for (``--stages``), and is
then trained (resumable per epoch), evaluated, saved and reported. A dataset with a pretrained Oracle and
library (ImageNet) loads those and trains only the experts. Teacher (Oracle) outputs are computed once per
augmented view and shared by the library and all experts; all experts to be made train together in one pass
over the data, on one library forward per batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from PoE import distributed
from PoE.data import Batch, FolderLoader, TensorLoader
from PoE.datasets.folder import DESCRIPTION_FILE
from PoE.errors import PoEError
from PoE.losses import ckd_loss, kd_loss
from PoE.networks import bank_of, build_network, family_of, unbank
from PoE.networks.mobilenetv2 import MobileNetLibrary, library_state
from PoE.networks.pretrained import imagenet_weights
from PoE.preprocess import STAGES, Preprocessor, Report, Settings, StageRecord
from PoE.profiles import StageConfig
from PoE.store import check_writable, half_state, load_checkpoint, load_into, save_json, state_id, unwrap
from PoE.tasks import adopt_library, store_hierarchy
from PoE.teacher import TeacherOutputs
from PoE.train import compiled, seed_everything, train_stage


@dataclass
class Part:
    """A finished part (the Oracle, the library, one expert) and the metadata its checkpoint records."""

    module: nn.Module
    meta: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.meta["id"])


class Stage:
    """One stage of a run. A stage names its parts (``keys``), loads a finished one (``load``: None when it must
    be made), makes the others (``make``: train, evaluate, save) and reports each (``report``); ``run`` is the
    order in which every stage does so."""

    name: ClassVar[str]  # as --stages and --retrain name it

    def __init__(self, prep: Preprocessor) -> None:
        self.prep, self.s, self.cfg = prep, prep.s, prep.cfg

    @property
    def conf(self) -> StageConfig:
        return getattr(self.s, self.name)

    def keys(self) -> list[str]:
        return [self.name]

    @property
    def resume_file(self) -> Path:
        """Where the stage's per-epoch progress waits to be resumed: beside the Oracle, which every pool shares."""
        return self.prep.pretrained / "resume" / f"{self.name}.pt"

    def target(self, key: str) -> Path:
        """The file that making part ``key`` writes (named when it is missing)."""
        raise NotImplementedError

    def load(self, key: str) -> Part | None:
        raise NotImplementedError

    def make(self, todo: list[str]) -> dict[str, Part]:
        raise NotImplementedError

    def report(self, key: str, part: Part) -> None:
        raise NotImplementedError

    def run(self) -> dict[str, Part]:
        """Load every part that is finished and fits; make the others if this stage was asked for; report all."""
        parts = {key: self.load(key) for key in self.keys()}
        todo = [key for key, part in parts.items() if part is None]
        if todo and self.name not in self.s.stages:
            raise self.missing(todo)
        if todo:
            parts.update(self.make(todo))
            self.drop_progress()  # only now: killed before its outputs were saved, a rerun resumes, not retrains
        for key, part in parts.items():
            self.report(key, part)
        return parts

    def missing(self, todo: list[str]) -> PoEError:
        return PoEError(
            f"missing {self.target(todo[0])}; make it with: python Run_preprocessing.py --dataset {self.cfg.name} "
            f"--stages {self.name}{self.flags(todo)}"
        )

    def flags(self, todo: list[str]) -> str:
        """What else the command that makes ``todo`` must say."""
        return ""

    def finished(self, path: Path, kind: str) -> tuple[dict, dict] | None:
        """(state_dict, meta) of a finished part's checkpoint, or None when it must be (re)made."""
        if self.name in self.s.retrain or not path.exists():
            return None
        sd, meta = unwrap(load_checkpoint(path), path, kind)
        if self.prep.is_pool_part(path) and not self.prep.adopt(path, {**meta, "state_dict": sd}, self.name):
            return None  # a pool part the manifest does not list as it is
        return sd, meta

    def start(self, module: nn.Module) -> tuple[nn.Module, TensorLoader | FolderLoader]:
        """``module`` as the training step calls it (under DDP with several processes, compiled when asked) and
        the stage's loader. Seed the stage before building what it trains."""
        loader = self.prep.loader(self.name, self.conf)
        return compiled(distributed.wrap(module), self.name in self.s.compile), loader

    def drop_progress(self) -> None:
        """Remove the stage's resume file once the parts it trained are evaluated and saved."""
        if distributed.is_main():
            self.resume_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the folder goes once empty; another run's file keeps it
                self.resume_file.parent.rmdir()

    def train(
        self,
        modules: dict[str, nn.Module],
        loss_fn: Callable[[Batch], torch.Tensor],
        loader: TensorLoader | FolderLoader,
        batches: Callable[[int], Iterator[Batch]],
        fingerprint: dict[str, Any],
        frozen: tuple[nn.Module, ...] = (),
    ) -> dict[str, Any]:
        """Train ``modules`` on the stage's schedule, resuming ``resume_file`` when its fingerprint matches;
        the training part of the parts' metadata."""
        resume = self.resume_file
        if self.name in self.s.retrain and distributed.is_main():
            resume.unlink(missing_ok=True)
        distributed.barrier()  # no rank reads a resume file rank 0 is about to drop
        conf = self.conf
        fingerprint = {
            "stage": self.name,
            "dataset": self.cfg.name,
            "seed": self.s.seed,
            "config": repr(conf),
            "train_limit": self.s.train_limit,
            **fingerprint,
        }
        history = train_stage(self.name, modules, loss_fn, batches, len(loader), conf, resume, fingerprint, frozen,
                              progress=self.s.progress, precision=self.s.precision)  # fmt: skip
        return {
            "epochs": conf.epochs,
            "config": repr(conf),
            "seed": self.s.seed,
            "train_seconds": history["seconds"],
            "epoch_seconds": history.get("epoch_seconds", []),
            "sittings": history.get("sittings", []),
        }


# ---------------------------------------------------------------------------- Oracle
class Oracle(Stage):
    """The Oracle, trained here on all classes by cross-entropy. It is kept at fp16: half the file, and the
    stored Oracle is exactly the one measured and distilled."""

    name = "oracle"

    def target(self, key: str) -> Path:
        return self.prep.pretrained / "oracle.pt"

    @property
    def views(self) -> int:
        """Augmented views whose logits the teacher caches."""
        return self.s.teacher_views

    def teacher(self) -> TeacherOutputs:
        """Run the stage; its Oracle as the teacher of the later stages."""
        oracle = self.run()[self.name]
        return TeacherOutputs(oracle.module, oracle.id, self.views, self.s.seed, self.prep.pretrained / "cache",
                              self.s.progress, self.s.precision)  # fmt: skip

    def ready(self, model: nn.Module) -> nn.Module:
        return model.to(self.s.device).to(memory_format=torch.channels_last).eval()

    def load(self, key: str) -> Part | None:
        path, arch = self.target(key), self.s.oracle_arch
        found = self.finished(path, "oracle")
        if found is None:
            return None
        sd, meta = found
        if meta.get("arch") != arch and self.name in self.s.stages:
            raise PoEError(
                f"{path} holds a {meta.get('arch')} Oracle but this run asks for {arch}; pass "
                f"--retrain oracle to replace it, or --oracle_arch {meta.get('arch')}"
            )
        arch = str(meta.get("arch"))
        return Part(self.ready(load_into(build_network(arch, self.cfg), sd, path, f"{arch} Oracle")), meta)

    def make(self, todo: list[str]) -> dict[str, Part]:
        arch, conf = self.s.oracle_arch, self.conf
        seed_everything(self.s.stage_seed(self.name))
        model = build_network(arch, self.cfg).to(self.s.device).to(memory_format=torch.channels_last)
        net, loader = self.start(model)

        def loss_fn(b: Batch) -> torch.Tensor:
            return F.cross_entropy(net(b.x).float(), b.y, label_smoothing=conf.label_smoothing)

        meta = {"arch": arch, **self.train({"oracle": model}, loss_fn, loader, loader.epoch, {"arch": arch})}
        model.load_state_dict(half_state(model))
        meta["stored_as"] = "fp16"
        meta["test_acc"], meta["test_n"] = self.prep.evaluate(model, None)
        meta["id"] = state_id(model)
        self.prep.save(self.target(self.name), "oracle", meta, half_state(model))
        return {self.name: Part(self.ready(model), meta)}

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"Oracle ({part.meta.get('arch')})", "all classes", part.meta)
        self.prep.report.stages["oracle"] = StageRecord.of(part.meta)


class PretrainedOracle(Oracle):
    """A torchvision Oracle with its ImageNet weights (a file or the hub cache): loaded, never trained. It is
    scored on this run's tasks' test images, its argmax restricted to their classes (as the paper's table)."""

    views = 0  # the images are streamed with fresh augmentations: the Oracle runs on every batch

    def load(self, key: str) -> Part:
        arch = self.s.oracle_arch
        sd, source = imagenet_weights(arch, self.s.oracle_weights, "--oracle_weights")
        model = self.ready(load_into(build_network(arch, self.cfg), sd, source, f"{arch} Oracle"))
        meta: dict[str, Any] = {"arch": arch, "weights": str(source), "train_seconds": 0.0, "id": state_id(model)}
        meta["test_acc"], meta["test_n"] = self.prep.evaluate(model, self.prep.task_classes, restrict=True)
        return Part(model, meta)

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"Oracle ({part.meta['arch']}, pretrained)", "the tasks' classes", part.meta)
        self.prep.report.stages["oracle"] = StageRecord.of(part.meta, weights=part.meta["weights"])


# ---------------------------------------------------------------------------- library
class Library(Stage):
    """The library: the front of a whole WRN (the library student) distilled from the Oracle by KD. The student
    is kept beside the Oracle; its front goes to the pool, replacing the experts of any other library."""

    name = "library"

    def __init__(self, prep: Preprocessor, teacher: TeacherOutputs) -> None:
        super().__init__(prep)
        self.teacher = teacher
        self.student_path = prep.pretrained / "library_student.pt"

    def target(self, key: str) -> Path:
        return self.prep.pool.library

    def load(self, key: str) -> Part | None:
        path, arch = self.student_path, self.cfg.library_arch
        found = self.finished(path, "library_student") if self.target(key).exists() else None
        if found is not None and found[1].get("oracle_id") != self.teacher.oracle_id:
            if self.name not in self.s.stages:
                raise PoEError(
                    f"{path} was distilled from another Oracle than {self.prep.pretrained / 'oracle.pt'}; "
                    "run --stages library again"
                )
            self.prep.say(f"[library] {path} was distilled from another Oracle: retraining it")
            found = None
        if found is None:
            return None
        sd, meta = found
        student = load_into(build_network(arch, self.cfg), sd, path, f"{arch} library student")
        pool_file = self.target(key)
        lib_sd, lib_meta = unwrap(load_checkpoint(pool_file), pool_file, "library")
        if not self.prep.adopt(pool_file, {**lib_meta, "state_dict": lib_sd}, "library"):
            self.prep.replace_library(meta, student.front.state_dict())  # the student's front, as when it was made
        return Part(student.front.to(self.s.device).eval(), meta)

    def make(self, todo: list[str]) -> dict[str, Part]:
        teacher, conf, T, arch = self.teacher, self.conf, self.s.T, self.cfg.library_arch
        seed_everything(self.s.stage_seed(self.name))
        student = build_network(arch, self.cfg).to(self.s.device).to(memory_format=torch.channels_last)
        net, loader = self.start(student)

        def loss_fn(b: Batch) -> torch.Tensor:
            return kd_loss(net(b.x), teacher.logits(b, loader), T)

        fp = {"arch": arch, "oracle": teacher.oracle_id, "T": T, "views": self.s.teacher_views}
        meta = {"arch": arch, **self.train({"student": student}, loss_fn, loader, teacher.batches(loader, conf), fp)}
        meta["test_acc"], meta["test_n"] = self.prep.evaluate(student, None)
        meta.update(T=T, teacher_views=self.s.teacher_views, oracle_id=teacher.oracle_id, id=state_id(student.front),
                    teacher_seconds=teacher.seconds, family=family_of(self.cfg).name)  # fmt: skip
        self.prep.save(self.student_path, "library_student", meta, student.state_dict())
        self.prep.replace_library(meta, student.front.state_dict())
        return {self.name: Part(student.front.eval(), meta)}

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"library student ({self.cfg.library_arch})", "all classes", part.meta)
        self.prep.report.stages["library"] = StageRecord.of(part.meta)


class PretrainedLibrary(Stage):
    """The front of torchvision's ImageNet MobileNetV2 (features[:18]) as the library: not distilled. Written to
    the pool once; later runs load the pool's copy (``--retrain library`` replaces it)."""

    name = "library"

    def target(self, key: str) -> Path:
        return self.prep.pool.library

    def load(self, key: str) -> Part | None:
        path = self.target(key)
        found = self.finished(path, "library")
        if found is None:
            return None
        library = load_into(MobileNetLibrary(), found[0], path, f"{self.cfg.name} library")
        return Part(library.to(self.s.device).eval(), found[1])

    def make(self, todo: list[str]) -> dict[str, Part]:
        arch = self.cfg.library_arch
        full, source = imagenet_weights(arch, self.s.library_weights, "--library_weights")
        library = MobileNetLibrary()
        load_into(library, library_state(full), source, f"{arch} front (features[:18])")
        meta = {
            "arch": f"{arch} features[:18]",
            "weights": str(source),
            "train_seconds": 0.0,
            "id": state_id(library),
            "family": family_of(self.cfg).name,
        }
        self.prep.replace_library(meta, library.state_dict())
        return {self.name: Part(library.to(self.s.device).eval(), meta)}

    def report(self, key: str, part: Part) -> None:
        meta = part.meta
        scored = {**meta, "test_acc": float("nan"), "test_n": 0}
        self.prep.report.add(f"library ({meta.get('arch')}, pretrained)", "not scored alone", scored)
        self.prep.report.stages["library"] = StageRecord.of(meta, weights=meta.get("weights"))


# ---------------------------------------------------------------------------- experts
class Experts(Stage):
    """One expert per task on the frozen library's features, extracted by conditional KD from the Oracle's
    logits on the task's classes. An expert of another library (or, over a pretrained library, of another
    Oracle) is made again."""

    name = "experts"

    def __init__(self, prep: Preprocessor, teacher: TeacherOutputs, library: Part) -> None:
        super().__init__(prep)
        self.teacher, self.library, self.lib_id = teacher, library.module.eval(), library.id
        self.family = family_of(self.cfg)
        for p in self.library.parameters():
            p.requires_grad_(False)

    def keys(self) -> list[str]:
        return list(self.s.tasks)

    @property
    def resume_file(self) -> Path:
        """In the pool's own folder, so that pools over one library (the ablations) train side by side."""
        return self.prep.pool.root / "resume" / "experts.pt"

    def target(self, key: str) -> Path:
        return self.prep.pool.expert(key)

    def flags(self, todo: list[str]) -> str:
        return " --tasks " + " ".join(todo)

    def load(self, key: str) -> Part | None:
        path = self.target(key)
        found = self.finished(path, "expert")
        if found is not None and found[1].get("library_id") != self.lib_id:
            self.prep.say(f"[experts] {path} was trained on another library: retraining it")
            found = None
        if self.cfg.pretrained and found is not None and found[1].get("oracle_id") != self.teacher.oracle_id:
            # a pretrained library does not change with the Oracle: check the Oracle itself
            self.prep.say(f"[experts] {path} was distilled from another Oracle: retraining it")
            found = None
        if found is None:
            return None
        e = self.family.new_expert(self.library, self.cfg.expert_width, len(self.cfg.tasks[key]))
        return Part(load_into(e, found[0], path, f"expert of {key!r}").to(self.s.device), found[1])

    def make(self, todo: list[str]) -> dict[str, Part]:
        """Train every expert of ``todo`` at once as one bank (one library forward, one bank forward and backward,
        one optimizer step per batch), each on its own conditional KD loss; write each back as its own file."""
        teacher, conf, library, tasks = self.teacher, self.conf, self.library, self.cfg.tasks
        seed_everything(self.s.stage_seed(self.name))
        fresh = [self.family.new_expert(library, self.cfg.expert_width, len(tasks[t])) for t in todo]
        bank = bank_of(fresh).to(self.s.device).to(memory_format=torch.channels_last)
        cols = [torch.tensor(tasks[t], device=self.s.device) for t in todo]
        ends = torch.tensor([len(tasks[t]) for t in todo]).cumsum(0).tolist()
        T, alpha, soft, scale = self.s.T, self.s.alpha, self.s.soft, self.s.scale
        trained, loader = self.start(bank)

        def loss_fn(b: Batch) -> torch.Tensor:
            with torch.no_grad():  # one library forward and one teacher lookup serve every expert
                features = library(b.x)
                t_all = teacher.logits(b, loader)
            out = trained(features)
            losses = [ckd_loss(out[:, end - len(c) : end], t_all[:, c], T, alpha, soft, scale)
                      for c, end in zip(cols, ends, strict=True)]  # fmt: skip
            return torch.stack(losses).sum()

        fp = {"tasks": todo, "library": self.lib_id, "oracle": teacher.oracle_id, "T": T, "alpha": alpha, "soft": soft,
              "scale": scale, "views": self.s.teacher_views, "form": "bank"}  # fmt: skip
        batches = teacher.batches(loader, conf)
        run = self.train({"bank": bank}, loss_fn, loader, batches, fp, frozen=(library,))
        self.prep.report.stages["experts"] = StageRecord(None, run["train_seconds"], None, run.pop("epoch_seconds"),
                                                         run.pop("sittings"))  # fmt: skip
        run["train_seconds"] /= len(todo)
        parts = {}
        for t, e, state in zip(todo, fresh, unbank(bank), strict=True):
            e = load_into(e, state, self.target(t), f"expert of {t!r}").to(self.s.device).eval()
            meta = {"task": t, "classes": tasks[t], **run, "T": T, "alpha": alpha, "trained_with": len(todo),
                    "losses": {"soft": soft, "scale": scale}, "library_id": self.lib_id,
                    "oracle_id": teacher.oracle_id, "family": self.family.name}  # fmt: skip
            meta["test_acc"], meta["test_n"] = self.prep.evaluate(nn.Sequential(library, e), tasks[t])
            meta["id"] = state_id(e)
            self.prep.save(self.target(t), "expert", meta, e.state_dict())
            parts[t] = Part(e, meta)
        return parts

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"expert {key}", "its task's classes", part.meta)


# ---------------------------------------------------------------------------- the phase
def run(s: Settings) -> Report:
    """Run (or load) every stage up to the last one asked for; report all of them."""
    t0 = time.perf_counter()
    prep = Preprocessor(s)
    if distributed.is_main():  # a read-only output folder fails now, not after the first stage trained
        for folder in (prep.pretrained, prep.pool.root):
            check_writable(folder)
        for folder in (prep.pretrained, prep.pool.root) if s.cfg.description else ():
            save_json(folder / DESCRIPTION_FILE, s.cfg.description)  # what a folder dataset's pool was built from
    distributed.barrier()
    if s.library_from is not None:  # every rank: rank 0 writes, the others wait in the write
        adopt_library(s.library_from, prep)
    last = max(STAGES.index(st) for st in s.stages)
    if s.oracle_file is not None:
        from PoE.oracle import FileOracle  # it builds on this module

        teacher = FileOracle(prep).teacher()
    else:
        teacher = (PretrainedOracle if s.cfg.pretrained else Oracle)(prep).teacher()
    if last >= 1:
        library = (PretrainedLibrary(prep) if s.cfg.pretrained else Library(prep, teacher)).run()["library"]
        if last >= 2:
            if distributed.is_main() and s.hierarchy is not None:
                store_hierarchy(prep.pool.root, s.hierarchy, s.cfg)
            distributed.barrier()
            Experts(prep, teacher, library).run()
        if distributed.is_main():
            prep.write_manifest()
    prep.report.teacher_cache_seconds = teacher.seconds
    prep.report.wall_seconds = time.perf_counter() - t0
    return prep.report
