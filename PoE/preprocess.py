"""The preprocessing phase: Oracle -> library (distilled WRN front) -> experts (conditional KD).

Each stage is loaded when its checkpoint exists and still fits what it was built from (its
teacher's id is recorded in it), and trained otherwise. Training is resumable per epoch. Teacher
(Oracle) outputs are computed once per augmented view and shared by the library and all experts;
all requested experts train together in one pass over the data, on one library forward per batch.
Model selection: the final epoch of every stage is kept; the test set is only used for reporting.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from PoE.config import DatasetConfig, Profile, StageConfig
from PoE.data import Batch, ImageSet, Normalizer, TensorLoader, file_sha256, load_split
from PoE.errors import PoEError
from PoE.evaluate import accuracy
from PoE.losses import ckd_loss, kd_loss
from PoE.networks import WideResNet, WRNExpert, build_network, new_expert
from PoE.store import PoolPaths, load_checkpoint, load_into, save_checkpoint, save_json, unwrap
from PoE.train import seed_everything, train_stage

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

    def stage_seed(self, stage: str) -> int:
        return self.seed * 100 + STAGES.index(stage)


def state_id(module: nn.Module) -> str:
    """A short content hash of a module's weights, recorded by whatever is trained from it."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TeacherOutputs:
    """The Oracle's logits for training batches, cached per augmented view when ``views`` > 0.

    Epoch ``e`` of a later stage uses view ``e % views``; each view's logits (fp16, N x classes) are
    computed once in eval mode, saved under ``cache_dir`` and reused by every stage and expert.
    With ``views`` = 0 the Oracle runs on every batch instead (a fresh augmentation every epoch).
    """

    def __init__(
        self, oracle: nn.Module, oracle_id: str, views: int, view_seed: int, cache_dir: Path, progress: bool
    ) -> None:
        self.oracle, self.oracle_id, self.views, self.view_seed = oracle.eval(), oracle_id, views, view_seed
        self.cache_dir, self.progress = cache_dir, progress
        self.current: tuple[int, torch.Tensor] | None = None
        self.seconds = 0.0

    def batches(self, loader: TensorLoader) -> Callable[[int], Iterator[Batch]]:
        """Epoch -> batches of ``loader``, drawn from the views whose logits this object serves."""
        assert loader.view_seed == self.view_seed
        return lambda epoch: loader.epoch(epoch, epoch % self.views if self.views else epoch)

    @torch.no_grad()
    def logits(self, batch: Batch, loader: TensorLoader) -> torch.Tensor:
        if not self.views:
            return self.oracle(batch.x).float()
        if self.current is None or self.current[0] != batch.view:
            self.current = (batch.view, self.load_view(batch.view, loader))
        return self.current[1][batch.index].to(batch.x.device).float()

    @torch.no_grad()
    def load_view(self, view: int, loader: TensorLoader) -> torch.Tensor:
        n = len(loader.data)
        path = self.cache_dir / f"teacher_{self.oracle_id}_seed{self.view_seed}_n{n}_view{view:04d}.pt"
        if path.exists():
            table = load_checkpoint(path).get("logits")
            if isinstance(table, torch.Tensor) and table.shape[0] == n:
                return table
        t0 = time.perf_counter()
        parts = []
        steps = -(-n // 500)
        for batch in tqdm(
            loader.ordered(view, 500), total=steps, desc=f"teacher view {view}", leave=False, disable=not self.progress
        ):
            parts.append(self.oracle(batch.x).half().cpu())
        table = torch.cat(parts)
        save_checkpoint(path, {"logits": table})
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
    keys = ("arch", "epochs", "config", "test_acc", "test_n", "train_seconds", "teacher_seconds")
    return {k: meta[k] for k in keys if k in meta}


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
        self.teacher: TeacherOutputs | None = None

    # ---------------------------------------------------------------- helpers
    @property
    def train_set(self) -> ImageSet:
        if self._train is None:
            data = load_split(self.cfg.name, self.s.data_root, "train")
            if self.s.train_limit and self.s.train_limit < len(data):
                g = torch.Generator().manual_seed(self.s.seed)
                data = data.subset(torch.randperm(len(data), generator=g)[: self.s.train_limit].sort().values)
            self._train = data
        return self._train

    @property
    def test_set(self) -> ImageSet:
        if self._test is None:
            self._test = load_split(self.cfg.name, self.s.data_root, "test")
        return self._test

    def loader(self, stage: str, conf: StageConfig) -> TensorLoader:
        """Batch order seeded per stage; augmented views seeded per run, so cached teacher views match."""
        return TensorLoader(
            self.train_set,
            conf.batch_size,
            self.normalize,
            self.cfg.crop_pad,
            self.s.device,
            self.s.stage_seed(stage),
            view_seed=self.s.seed,
        )

    def evaluate(self, model: nn.Module, classes: list[int] | None) -> tuple[float, int]:
        return accuracy(model, self.test_set, classes, self.normalize, self.s.device, progress=self.s.progress)

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
        if stage in self.s.retrain:
            resume.unlink(missing_ok=True)
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
            stage, modules, loss_fn, batches, len(loader), conf, resume, fingerprint, frozen, progress=self.s.progress
        )
        resume.unlink(missing_ok=True)
        return {"epochs": conf.epochs, "config": repr(conf), "seed": self.s.seed, "train_seconds": history["seconds"]}

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

            def loss_fn(b: Batch) -> torch.Tensor:
                return F.cross_entropy(model(b.x), b.y, label_smoothing=conf.label_smoothing)

            meta = {
                "arch": arch,
                **self.train("oracle", {"oracle": model}, loss_fn, loader, loader.epoch, {"arch": arch}),
            }
            meta["test_acc"], meta["test_n"] = self.evaluate(model, None)
            meta["id"] = state_id(model)
            save_checkpoint(
                path,
                {"poe_format": 1, "kind": "oracle", "dataset": self.cfg.name, **meta, "state_dict": model.state_dict()},
            )
        self.report.add(f"Oracle ({arch})", "all classes", meta)
        self.report.info["oracle"] = summary(meta)
        model = model.to(self.s.device).to(memory_format=torch.channels_last).eval()
        self.teacher = TeacherOutputs(
            model, str(meta["id"]), self.s.teacher_views, self.s.seed, self.pre / "cache", self.s.progress
        )
        return model, str(meta["id"])

    # ---------------------------------------------------------------- library
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
            print(f"[library] {path} was distilled from another Oracle: retraining it")
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

            def loss_fn(b: Batch) -> torch.Tensor:
                return kd_loss(student(b.x), teacher.logits(b, loader), T)

            fp = {"arch": arch, "oracle": oracle_id, "T": T, "views": self.s.teacher_views}
            meta = {
                "arch": arch,
                **self.train("library", {"student": student}, loss_fn, loader, teacher.batches(loader), fp),
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
            save_checkpoint(path, {**base, "kind": "library_student", "state_dict": student.state_dict()})
            save_checkpoint(lib_path, {**base, "kind": "library", "state_dict": student.front.state_dict()})
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
                print(f"[experts] {path} was trained on another library: retraining it")
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

        def loss_fn(b: Batch) -> torch.Tensor:
            with torch.no_grad():  # one library forward and one teacher lookup serve every expert
                features = library(b.x)
                t_all = teacher.logits(b, loader)
            losses = [ckd_loss(e(features), t_all[:, cols[t]], T, alpha, soft, scale) for t, e in experts.items()]
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
        run = self.train("experts", dict(experts), loss_fn, loader, teacher.batches(loader), fp, frozen=(library,))
        self.report.info["experts_seconds"] = run["train_seconds"]
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
            save_checkpoint(
                self.pool.expert(t),
                {"poe_format": 1, "kind": "expert", "dataset": self.cfg.name, **meta, "state_dict": e.state_dict()},
            )
            metas[t] = meta
        return experts, metas

    # ---------------------------------------------------------------- run
    def run(self) -> Report:
        """Run (or load) every stage up to the last one asked for; report all of them."""
        t0 = time.perf_counter()
        last = max(STAGES.index(st) for st in self.s.stages)
        _, oracle_id = self.oracle()
        if last >= 1:
            student, lib_id = self.library(oracle_id)
            if last >= 2:
                self.experts(student.front, lib_id)
            self.write_manifest()
        assert self.teacher is not None
        self.report.info["teacher_cache_seconds"] = self.teacher.seconds
        self.report.info["wall_seconds"] = time.perf_counter() - t0
        return self.report

    def write_manifest(self) -> None:
        old = self.pool.read_manifest()
        experts = dict(old.get("experts", {}))
        for part, _scope, acc, n, sec in self.report.rows:
            if part.startswith("expert "):
                t = part[len("expert ") :]
                experts[t] = {
                    "classes": self.cfg.tasks[t],
                    "test_acc": round(acc, 2),
                    "test_n": n,
                    "train_seconds": round(sec, 1),
                }
        train_npz = self.s.data_root / self.cfg.name / "train.npz"
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
            "train_data_sha256": file_sha256(train_npz) if train_npz.exists() else None,
            "oracle": self.report.info.get("oracle"),
            "library": self.report.info.get("library"),
            "experts": dict(sorted(experts.items())),
            "model_selection": "final epoch of every stage (the test set is only used for reporting)",
        }
        save_json(self.pool.manifest, manifest)
