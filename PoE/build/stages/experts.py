"""The experts stage: every expert of the run trained at once as one bank, by conditional KD."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from PoE.build.losses import ckd_loss
from PoE.build.preprocess import Preprocessor, StageRecord, say
from PoE.build.stages.base import Part, Stage
from PoE.build.teacher import TeacherOutputs
from PoE.build.train import seed_everything
from PoE.core.checkpoint import load_into, state_id
from PoE.core.loaders import Batch
from PoE.core.networks import bank_of, family_of, unbank


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
        return list(self.plan.tasks)

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
            say(f"[experts] {path} was trained on another library: retraining it")
            found = None
        if self.cfg.networks.pretrained and found is not None and found[1].get("oracle_id") != self.teacher.oracle_id:
            # a pretrained library does not change with the Oracle: check the Oracle itself
            say(f"[experts] {path} was distilled from another Oracle: retraining it")
            found = None
        if found is None:
            return None
        e = self.family.new_expert(self.library, self.cfg.networks.expert_width, len(self.cfg.tasks[key]))
        return Part(load_into(e, found[0], path, f"expert of {key!r}").to(self.execution.device), found[1])

    def make(self, todo: list[str]) -> dict[str, Part]:
        """Train every expert of ``todo`` at once as one bank (one library forward, one bank forward and backward,
        one optimizer step per batch), each on its own conditional KD loss; write each back as its own file."""
        teacher, conf, library, tasks = self.teacher, self.conf, self.library, self.cfg.tasks
        seed_everything(self.training.stage_seed(self.name))
        fresh = [self.family.new_expert(library, self.cfg.networks.expert_width, len(tasks[t])) for t in todo]
        bank = bank_of(fresh).to(self.execution.device).to(memory_format=torch.channels_last)
        cols = [torch.tensor(tasks[t], device=self.execution.device) for t in todo]
        ends = torch.tensor([len(tasks[t]) for t in todo]).cumsum(0).tolist()
        training = self.training
        T, alpha, soft, scale = training.T, training.alpha, training.soft, training.scale
        trained, loader = self.start(bank)

        def loss_fn(b: Batch) -> torch.Tensor:
            with torch.no_grad():  # one library forward and one teacher lookup serve every expert
                features = library(b.x)
                t_all = teacher.logits(b, loader)
            out = trained(features)
            losses = [
                ckd_loss(out[:, end - len(c) : end], t_all[:, c], T, alpha, soft, scale)
                for c, end in zip(cols, ends, strict=True)
            ]
            return torch.stack(losses).sum()

        fp = {
            "tasks": todo,
            "classes": [tasks[t] for t in todo],
            "library": self.lib_id,
            "oracle": teacher.oracle_id,
            "T": T,
            "alpha": alpha,
            "soft": soft,
            "scale": scale,
            "views": self.training.teacher_views,
            "form": "bank",
        }
        batches = teacher.batches(loader, conf)
        run = self.train({"bank": bank}, loss_fn, loader, batches, fp, frozen=(library,))
        self.prep.report.stages["experts"] = StageRecord(
            None, run["train_seconds"], None, run.pop("epoch_seconds"), run.pop("sittings")
        )
        run["train_seconds"] /= len(todo)
        parts = {}
        for t, e, state in zip(todo, fresh, unbank(bank), strict=True):
            e = load_into(e, state, self.target(t), f"expert of {t!r}").to(self.execution.device).eval()
            meta = {
                "task": t,
                "classes": tasks[t],
                **run,
                "T": T,
                "alpha": alpha,
                "trained_with": len(todo),
                "losses": {"soft": soft, "scale": scale},
                "library_id": self.lib_id,
                "oracle_id": teacher.oracle_id,
                "family": self.family.name,
            }
            meta["test_acc"], meta["test_n"] = self.prep.scores.evaluate(nn.Sequential(library, e), tasks[t])
            meta["id"] = state_id(e)
            self.prep.files.save(self.target(t), "expert", meta, e.state_dict())
            parts[t] = Part(e, meta)
        return parts

    def report(self, key: str, part: Part) -> None:
        self.prep.report.add(f"expert {key}", "its task's classes", part.meta)
