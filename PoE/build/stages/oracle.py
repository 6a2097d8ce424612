"""The Oracle stage: trained here on all classes (from scratch, or a MobileNetV2 from ImageNet weights in a local
file), or a pretrained torchvision network (ImageNet)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from PoE.build.oracle import ProgramOracle, check_program, class_order, load_program, seconds_per_8
from PoE.build.preprocess import StageRecord
from PoE.build.stages.base import Part, Stage
from PoE.build.teacher import TeacherOutputs
from PoE.build.train import seed_everything
from PoE.core.checkpoint import files_id, half_state, load_into, state_id
from PoE.core.errors import PoEError
from PoE.core.loaders import Batch
from PoE.core.networks import build_network
from PoE.core.networks.pretrained import imagenet_weights


# ---------------------------------------------------------------------------- Oracle
class Oracle(Stage):
    """The Oracle, trained here on all classes by cross-entropy: from scratch, or (``--oracle_weights``, a folder
    of large images) fine-tuned from a whole MobileNetV2's ImageNet weights. It is kept at fp16: half the file,
    and the stored Oracle is exactly the one measured and distilled."""

    name = "oracle"

    def target(self, key: str) -> Path:
        return self.prep.pretrained / "oracle.pt"

    @property
    def views(self) -> int:
        """Augmented views whose logits the teacher caches."""
        return self.training.teacher_views

    def teacher(self) -> TeacherOutputs:
        """Run the stage; its Oracle as the teacher of the later stages."""
        oracle = self.run()[self.name]
        return TeacherOutputs(
            oracle.module,
            oracle.id,
            self.views,
            self.training.seed,
            self.prep.pretrained / "cache",
            self.execution.runtime,
            self.execution.progress,
        )

    def ready(self, model: nn.Module) -> nn.Module:
        return model.to(self.execution.device).to(memory_format=torch.channels_last).eval()

    def load(self, key: str) -> Part | None:
        path, arch = self.target(key), self.training.oracle_arch
        found = self.finished(path, "oracle")
        if found is None:
            return None
        sd, meta = found
        if meta.get("arch") != arch and self.name in self.plan.stages:
            raise PoEError(
                f"{path} holds a {meta.get('arch')} Oracle but this run asks for {arch}; pass "
                f"--retrain oracle to replace it, or --oracle_arch {meta.get('arch')}"
            )
        arch = str(meta.get("arch"))
        return Part(self.ready(load_into(build_network(arch, self.cfg), sd, path, f"{arch} Oracle")), meta)

    def make(self, todo: list[str]) -> dict[str, Part]:
        arch, conf = self.training.oracle_arch, self.conf
        seed_everything(self.training.stage_seed(self.name))
        model = build_network(arch, self.cfg)
        start = self.start_weights(model, self.places.oracle_weights, "--oracle_weights")
        model = model.to(self.execution.device).to(memory_format=torch.channels_last)
        net, loader = self.start(model)

        def loss_fn(b: Batch) -> torch.Tensor:
            return F.cross_entropy(net(b.x).float(), b.y, label_smoothing=conf.label_smoothing)

        given = {"start": start} if start else {}  # recorded only when given: other runs' records stay as they were
        fp = {"arch": arch, **given}
        meta = {"arch": arch, **given, **self.train({"oracle": model}, loss_fn, loader, loader.epoch, fp)}
        model.load_state_dict(half_state(model))
        meta["stored_as"] = "fp16"
        meta["test_acc"], meta["test_n"] = self.prep.scores.evaluate(model, None)
        meta["id"] = state_id(model)
        self.prep.files.save(self.target(self.name), "oracle", meta, half_state(model))
        return {self.name: Part(self.ready(model), meta)}

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"Oracle ({part.meta.get('arch')})", "all classes", part.meta)
        self.prep.report.stages["oracle"] = StageRecord.of(part.meta)


class PretrainedOracle(Oracle):
    """A torchvision Oracle with its ImageNet weights (a file or the hub cache): loaded, never trained. It is
    scored on this run's tasks' test images, its argmax restricted to their classes (as the paper's table)."""

    views = 0  # the images are streamed with fresh augmentations: the Oracle runs on every batch

    def load(self, key: str) -> Part:
        arch = self.training.oracle_arch
        sd, source = imagenet_weights(arch, self.places.oracle_weights, "--oracle_weights")
        model = self.ready(load_into(build_network(arch, self.cfg), sd, source, f"{arch} Oracle"))
        meta: dict[str, Any] = {"arch": arch, "weights": str(source), "train_seconds": 0.0, "id": state_id(model)}
        meta["test_acc"], meta["test_n"] = self.prep.scores.evaluate(model, self.prep.data.task_classes, restrict=True)
        return Part(model, meta)

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"Oracle ({part.meta['arch']}, pretrained)", "the tasks' classes", part.meta)
        self.prep.report.stages["oracle"] = StageRecord.of(part.meta, weights=part.meta["weights"])


class FileOracle(Oracle):
    """The Oracle stage with the user's program: loaded, checked, scored; never trained. Its id is the file's
    content hash, so the library and experts distilled from it (and the cached logits) are tied to it."""

    def load(self, key: str) -> Part:
        path = Path(self.places.oracle_file)
        order = class_order(Path(self.places.oracle_classes), self.cfg) if self.places.oracle_classes else None
        seconds = seconds_per_8()
        program = load_program(path, self.places.trust_oracle_code, self.execution.device, seconds)
        model = ProgramOracle(program, self.cfg, order, path, seconds).to(self.execution.device).eval()
        test = self.prep.data.test_set
        check_program(model, self.prep.data.normalize(test.x[:8].to(self.execution.device)), self.cfg, path)
        meta: dict[str, Any] = {"arch": f"file {path.name}", "file": str(path), "train_seconds": 0.0}
        meta["id"] = files_id([path] + ([Path(self.places.oracle_classes)] if self.places.oracle_classes else []))
        classes = self.prep.data.task_classes if self.cfg.streamed else None
        meta["test_acc"], meta["test_n"] = self.prep.scores.evaluate(model, classes, restrict=self.cfg.streamed)
        return Part(model, meta)

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"Oracle ({part.meta['file']}, yours)", "all classes", part.meta)
        self.prep.report.stages["oracle"] = StageRecord.of(part.meta, weights=part.meta["file"])
