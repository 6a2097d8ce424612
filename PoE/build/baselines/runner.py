"""The runner of the baselines (``PoE.build.baselines``): trains a method for a query and scores it, and the command
lines' schedule of them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from PoE.build.baselines import method as baseline_method
from PoE.build.baselines.base import Context
from PoE.build.profiles import KD_ALPHA, KD_T, PAPER_LR, StageConfig
from PoE.build.teacher import TeacherOutputs
from PoE.build.train import Feed, seed_everything, train_stage
from PoE.core.checkpoint import load_checkpoint, load_into, save_checkpoint, unwrap
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import DatasetConfig
from PoE.core.errors import PoEError
from PoE.core.evaluate import accuracy, count_macs, count_params
from PoE.core.loaders import Batch, Draw, TensorLoader
from PoE.core.networks import build_network, family_of
from PoE.core.query import Query, make_query
from PoE.core.runtime import CPU, Runtime
from PoE.query.pool import Pool


def target_network(cfg: DatasetConfig, n_tasks: int, num_classes: int, front: nn.Module | None = None) -> nn.Module:
    """Library-shaped front (new, or the given one) + an expert-shaped back ``n_tasks`` times as wide (fc over
    ``num_classes``), of the dataset's network family."""
    return family_of(cfg).target_network(cfg, n_tasks, num_classes, front)


@dataclass(frozen=True)
class Sources:
    """What the methods train from, each loaded when a method first asks: ``oracle()`` the Oracle,
    ``pool_part(None)`` PoE's library and ``pool_part(task)`` an expert; where Scratch teachers are cached."""

    oracle: Callable[[], nn.Module] | None = None
    pool_part: Callable[[str | None], nn.Module] | None = None
    teacher_dir: Path | None = None


@dataclass
class BaselineResult:
    method: str
    tasks: tuple[str, ...]
    accuracy: float
    n_test: int
    macs: int
    params: int
    seconds: float  # wall time to produce the model for this query (training)
    teacher_seconds: float = 0.0  # training the per-task Scratch teachers, when they had to be made
    epochs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class BaselineRunner:
    """Trains baselines for queries; the Oracle, PoE's pool and Scratch teachers are loaded on demand."""

    def __init__(
        self,
        cfg: DatasetConfig,
        train: ImageSet,
        test: ImageSet,
        stage: StageConfig,
        how: BaselineConfig,
        sources: Sources,
    ) -> None:
        """``how``: T, alpha, seed, the runtime, progress bars, and CKD's ``ckd_views`` (> 0: CKD reads the Oracle's
        logits from that many cached augmented views of the query's images, computed once per query, their time
        counted in the method's, instead of running it on every batch)."""
        self.cfg, self.train, self.test, self.stage = cfg, train, test, stage
        self.runtime, self.device = how.runtime, how.runtime.device
        self.T, self.alpha, self.seed, self.ckd_views, self.progress = (
            how.T,
            how.alpha,
            how.seed,
            how.ckd_views,
            how.progress,
        )
        self.oracle, self.pool_part, self.teacher_dir = sources.oracle, sources.pool_part, sources.teacher_dir
        self.normalize = Normalizer(cfg.mean, cfg.std, self.device)
        self.train_id = f"{len(train)}-{int(train.y.sum())}"  # tells a training subset from the full set

    def fingerprint(self) -> str:
        """What a result of this runner depends on besides the method, the query and the pool: a rerun with the
        same fingerprint may reuse a recorded result."""
        precision = self.runtime.precision
        key = f"{self.stage!r} {self.T} {self.alpha} {self.seed} {precision} {self.ckd_views} {self.train_id}"
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def need(self, what: str, getter: Callable | None) -> Callable:
        if getter is None:
            raise PoEError(f"this baseline needs {what}")
        return getter

    def fit(
        self,
        name: str,
        net: nn.Module,
        trainable: list[nn.Module],
        frozen: tuple[nn.Module, ...],
        loader: TensorLoader,
        loss_of: Callable[[torch.Tensor, Batch], torch.Tensor],
        teacher: TeacherOutputs | None = None,
    ) -> float:
        """Seconds to train ``trainable`` (with the teacher's cached views, when there is one, made first)."""
        holder = nn.ModuleList(trainable)

        def loss_fn(b: Batch) -> torch.Tensor:
            return loss_of(net(b.x), b)

        t0 = time.perf_counter()
        batches = loader.epoch if teacher is None else teacher.batches(loader, self.stage)
        feed = Feed(batches, len(loader), self.progress)
        train_stage(name, {"net": holder}, loss_fn, feed, self.stage, self.runtime, frozen=frozen)
        return time.perf_counter() - t0

    def scratch_teacher(self, task: str) -> tuple[nn.Module, float]:
        """The per-task Scratch model (trained once per schedule and cached in ``teacher_dir``)."""
        path = None
        if self.teacher_dir is not None:
            key = hashlib.sha256(f"{self.stage!r} {self.seed} {self.train_id}".encode()).hexdigest()[:12]
            path = self.teacher_dir / f"scratch_{task}_{key}.pt"
            if path.exists():
                sd, _ = unwrap(load_checkpoint(path), path, "scratch_teacher")
                net = target_network(self.cfg, 1, len(self.cfg.tasks[task]))
                return load_into(net, sd, path, f"Scratch teacher of {task!r}").to(self.device).eval(), 0.0
        result, net = self.run("scratch", [task], keep=True)
        if path is not None:
            save_checkpoint(
                path, {"poe_format": 1, "kind": "scratch_teacher", "task": task, "state_dict": net.state_dict()}
            )
        return net.eval(), result.seconds

    def run(self, method: str, tasks: list[str], keep: bool = False):
        """Train ``method`` for the query ``tasks``; returns the result (and the network if ``keep``)."""
        m = baseline_method(method)
        q: Query = make_query(tasks, self.cfg.tasks, self.cfg.name)
        subset, labels = self.train.with_classes(q.classes)
        train = ImageSet(subset.x, labels)  # labels are positions in the composite's ascending classes
        seed_everything(self.seed)
        if m.on_library:
            library = self.need("PoE's library (--db)", self.pool_part)(None).to(self.device).eval()
            for p in library.parameters():
                p.requires_grad_(False)
            net = target_network(self.cfg, len(tasks), q.num_classes, library).to(self.device)
            trainable, frozen = [net[1]], (library,)
        else:
            net = target_network(self.cfg, len(tasks), q.num_classes).to(self.device)
            trainable, frozen = [net], ()
        net = net.to(memory_format=torch.channels_last)
        loader = TensorLoader(
            train, self.stage.batch_size, self.normalize, self.cfg.crop_pad, self.device, Draw(self.seed)
        )
        loss = m.loss(Context(self, q, loader))
        seconds = self.fit(f"{method} {'+'.join(tasks)}", net, trainable, frozen, loader, loss.fn, loss.teacher)
        net.eval()
        acc, n = accuracy(net, self.test, q.classes, self.normalize, self.runtime.fp32)  # as PoE is
        shape = (3, self.cfg.image_size, self.cfg.image_size)
        result = BaselineResult(
            method,
            q.tasks,
            acc,
            n,
            count_macs(net, shape, self.device),
            count_params(net),
            seconds,
            loss.teacher_seconds,
            self.stage.epochs,
        )
        return (result, net) if keep else result


def budget_epochs(method: str, budget: float = 1.0) -> int:
    """Epochs of ``method`` at ``budget`` times the paper's schedule (at least one)."""
    return max(1, round(baseline_method(method).paper_epochs * budget))


def oracle_files(pretrained: str | Path, cfg: DatasetConfig) -> list[Path]:
    """The files of the Oracle in ``<pretrained>/<dataset>/``: ``oracle.pt`` and its shards, if any."""
    folder = Path(pretrained) / cfg.name
    return sorted(p for p in folder.glob("oracle.pt*") if p.is_file() and not p.name.endswith(".tmp"))


def load_oracle(pretrained: str | Path, cfg: DatasetConfig, device: torch.device) -> nn.Module:
    """The Oracle that preprocessing left in ``<pretrained>/<dataset>/oracle.pt``, ready to score."""
    path = Path(pretrained) / cfg.name / "oracle.pt"
    hint = f"make it with: python Run_preprocessing.py --dataset {cfg.name} --stages oracle"
    sd, meta = unwrap(load_checkpoint(path, hint), path, "oracle")
    arch = str(meta.get("arch"))
    model = load_into(build_network(arch, cfg), sd, path, f"{arch} Oracle")
    return model.to(device).to(memory_format=torch.channels_last).eval()


@dataclass(frozen=True)
class BaselineConfig:
    """How the baselines train: the command line's schedule, in one record (Run_Baselines, Run_Experiments)."""

    pretrained: Path  # folder of the Oracle; the per-task Scratch teachers are cached under it
    epochs: int | None = None  # None: ``budget`` times the paper's schedule of each method
    budget: float = 1.0
    lr: float = PAPER_LR
    batch_size: int = 512
    schedule: str = "step"
    T: float = KD_T
    alpha: float = KD_ALPHA
    seed: int = 0
    runtime: Runtime = CPU  # the training's; every accuracy is scored in fp32
    ckd_views: int = 0  # CKD: cached augmented views of the Oracle's logits (0: the Oracle on every batch)
    progress: bool = True

    def stage(self, method: str) -> StageConfig:
        return StageConfig(
            epochs=self.epochs or budget_epochs(method, self.budget),
            lr=self.lr,
            batch_size=self.batch_size,
            schedule=self.schedule,
        )


def baseline_runner(
    method: str,
    cfg: DatasetConfig,
    train: ImageSet,
    test: ImageSet,
    open_pool: Callable[[], Pool],
    how: BaselineConfig,
) -> BaselineRunner:
    """A BaselineRunner for ``method``. The Oracle is read from ``how.pretrained`` and the pool asked of
    ``open_pool`` (which keeps it: a command opens it once) only when the method needs them."""

    def pool_part(task: str | None) -> nn.Module:  # PoE's library, or the expert of ``task``
        pool = open_pool()
        return pool.library if task is None else pool.experts[pool.make_query([task]).tasks[0]]

    oracle = lambda: load_oracle(how.pretrained, cfg, how.runtime.device)  # noqa: E731
    sources = Sources(oracle, pool_part, how.pretrained / cfg.name / "baselines")
    return BaselineRunner(cfg, train, test, how.stage(method), how, sources)


def result_row(result: BaselineResult) -> dict[str, Any]:
    """A baseline's row of Run_Baselines' table."""
    return {k: v for k, v in asdict(result).items() if k != "extra"}


def poe_row(pool: Pool, query: Query, test: ImageSet) -> dict[str, Any]:
    """PoE's train-free model of ``query`` as a row beside the baselines: its build time is its time to produce."""
    model = pool.query(list(query.tasks))
    acc, n = model.accuracy(test)
    macs, params = model.cost()
    return {
        "method": "poe",
        "tasks": list(query.tasks),
        "accuracy": acc,
        "n_test": n,
        "macs": macs,
        "params": params,
        "seconds": model.build_ms / 1e3,
        "teacher_seconds": 0.0,
        "epochs": 0,
    }
