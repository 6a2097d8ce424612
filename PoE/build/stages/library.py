"""The library stage: a WRN or MobileNetV2 front distilled from the Oracle, or a pretrained MobileNetV2's front
(ImageNet)."""

from __future__ import annotations

from pathlib import Path

import torch

from PoE.build.losses import kd_loss
from PoE.build.preprocess import Preprocessor, StageRecord, say
from PoE.build.stages.base import Part, Stage
from PoE.build.teacher import TeacherOutputs
from PoE.build.train import seed_everything
from PoE.core.checkpoint import load_checkpoint, load_into, state_id, unwrap
from PoE.core.errors import PoEError
from PoE.core.loaders import Batch
from PoE.core.networks import build_network, family_of
from PoE.core.networks.mobilenetv2 import MobileNetLibrary, library_state
from PoE.core.networks.pretrained import imagenet_weights
from PoE.core.pool_paths import PoolPaths, resolve_pool


class Library(Stage):
    """The library: the front of a whole WRN or MobileNetV2 (the library student; a MobileNetV2 may start from a
    local ``--library_weights`` file) distilled from the Oracle by KD. The student is kept beside the Oracle; its
    front goes to the pool, replacing the experts of any other library."""

    name = "library"

    def __init__(self, prep: Preprocessor, teacher: TeacherOutputs) -> None:
        super().__init__(prep)
        self.teacher = teacher
        self.student_path = prep.pretrained / "library_student.pt"

    def target(self, key: str) -> Path:
        return self.prep.pool.library

    def load(self, key: str) -> Part | None:
        path, arch = self.student_path, self.cfg.networks.library_arch
        found = self.finished(path, "library_student") if self.target(key).exists() else None
        if found is not None and found[1].get("oracle_id") != self.teacher.oracle_id:
            if self.name not in self.plan.stages:
                raise PoEError(
                    f"{path} was distilled from another Oracle than {self.prep.pretrained / 'oracle.pt'}; "
                    "run --stages library again"
                )
            say(f"[library] {path} was distilled from another Oracle: retraining it")
            found = None
        if found is None:
            return None
        sd, meta = found
        arch = str(meta.get("arch", arch))  # as it was made (a MobileNetV2 started from weights is width 1)
        student = load_into(build_network(arch, self.cfg), sd, path, f"{arch} library student")
        pool_file = self.target(key)
        lib_sd, lib_meta = unwrap(load_checkpoint(pool_file), pool_file, "library")
        if not self.prep.files.adopt(pool_file, {**lib_meta, "state_dict": lib_sd}, "library"):
            self.prep.making([self.name])
            front = student.front.state_dict()  # the student's front, as when it was made
            self.prep.files.replace_library(meta, front)
        return Part(student.front.to(self.execution.device).eval(), meta)

    def make(self, todo: list[str]) -> dict[str, Part]:
        teacher, conf, T, arch = self.teacher, self.conf, self.training.T, self.cfg.networks.library_arch
        seed_everything(self.training.stage_seed(self.name))
        student = build_network(arch, self.cfg)
        start = self.start_weights(student, self.places.library_weights, "--library_weights")
        student = student.to(self.execution.device).to(memory_format=torch.channels_last)
        net, loader = self.start(student)

        def loss_fn(b: Batch) -> torch.Tensor:
            return kd_loss(net(b.x), teacher.logits(b, loader), T)

        given = {"start": start} if start else {}  # recorded only when given: other runs' records stay as they were
        fp = {"arch": arch, "oracle": teacher.oracle_id, "T": T, "views": self.training.teacher_views, **given}
        meta = {
            "arch": arch,
            **given,
            **self.train({"student": student}, loss_fn, loader, teacher.batches(loader, conf), fp),
        }
        meta["test_acc"], meta["test_n"] = self.prep.scores.evaluate(student, None)
        meta.update(
            T=T,
            teacher_views=self.training.teacher_views,
            oracle_id=teacher.oracle_id,
            id=state_id(student.front),
            teacher_seconds=teacher.seconds,
            family=family_of(self.cfg).name,
        )
        self.prep.files.save(self.student_path, "library_student", meta, student.state_dict())
        self.prep.files.replace_library(meta, student.front.state_dict())
        return {self.name: Part(student.front.eval(), meta)}

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(
            f"library student ({part.meta.get('arch', self.cfg.networks.library_arch)})", "all classes", part.meta
        )
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
        return Part(library.to(self.execution.device).eval(), found[1])

    def make(self, todo: list[str]) -> dict[str, Part]:
        arch = self.cfg.networks.library_arch
        full, source = imagenet_weights(arch, self.places.library_weights, "--library_weights")
        library = MobileNetLibrary()
        load_into(library, library_state(full), source, f"{arch} front (features[:18])")
        meta = {
            "arch": f"{arch} features[:18]",
            "weights": str(source),
            "train_seconds": 0.0,
            "id": state_id(library),
            "family": family_of(self.cfg).name,
        }
        self.prep.files.replace_library(meta, library.state_dict())
        return {self.name: Part(library.to(self.execution.device).eval(), meta)}

    def report(self, key: str, part: Part) -> None:
        meta = part.meta
        scored = {**meta, "test_acc": float("nan"), "test_n": 0}
        self.prep.report.add(f"library ({meta.get('arch')}, pretrained)", "not scored alone", scored)
        self.prep.report.stages["library"] = StageRecord.of(meta, weights=meta.get("weights"))


def adopt_library(source: str | Path, prep: Preprocessor) -> str:
    """Write the library of the pool at ``source`` into this run's pool (a new hierarchy's experts are trained
    on it), listed in its manifest as every part is; returns its id. For a distilled library it must be the
    front of the library student in ``--pretrained``, which the library stage loads: the experts record that
    id, and the pool checks it."""
    cfg, root, pretrained = prep.cfg, prep.pool.root, prep.s.places.pretrained
    src = resolve_pool(source, cfg.name, cfg.tag).library
    sd, meta = unwrap(load_checkpoint(src), src, "library")
    lib_id = meta.get("id")
    if lib_id is None:
        raise PoEError(
            f"--library_from: {src} records no content id (the original release's format); use a "
            "library this project wrote"
        )
    if not cfg.networks.pretrained:
        student = pretrained / cfg.name / "library_student.pt"
        own = unwrap(
            load_checkpoint(student, "--library_from needs the library student it was cut from"),
            student,
            "library_student",
        )[1].get("id")
        if own != lib_id:
            raise PoEError(
                f"--library_from: {src} is library {lib_id}, but {student} is the student of library "
                f"{own}: give the --pretrained folder the library was distilled in"
            )
    dest = PoolPaths(root, cfg.tag).library
    if dest.exists():
        have = unwrap(load_checkpoint(dest), dest, "library")[1].get("id")
        if have == lib_id:
            return lib_id
        raise PoEError(f"--library_from: {dest} already holds another library ({have}); give a new --db")
    prep.files.replace_library({k: v for k, v in meta.items() if k not in ("digest", "poe_format", "kind")}, sd)
    return lib_id
