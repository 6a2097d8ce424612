"""Train one task's expert several ways on a frozen library and the Oracle's cached teacher views, one setting
changed at a time, and score each on the task's test images: which of epochs, schedule, temperature, alpha,
teacher views (or another library) moves the expert.

The experts stage's own loop (``train_stage``: SGD, the schedule, per-epoch resume files, TensorLoader's
augmented views), made cheap enough for a shared CPU in two ways, both recorded with every result: the frozen
library's features and the Oracle's logits of each augmented view are computed once and kept (on disk under
``--work``) instead of running the library on every batch; and ``--others N`` trains on the task's own training
images plus N others drawn at random (seeded), not on all 50,000 (0: all of them, as Run_preprocessing.py).

    python scripts/expert_study.py --data_root ../shared/data --pretrained DB_pretrained --work /tmp/study/work \
        --task people --others 2500 --runs base T8:T=8 paper:epochs=100,schedule=step,batch_size=512,nesterov=0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.build.losses import ckd_loss
from PoE.build.profiles import PROFILES, STAGES, StageConfig
from PoE.build.train import Feed, Resume, seed_everything, train_stage
from PoE.cli.common import run_main
from PoE.core.checkpoint import load_checkpoint, load_into, save_checkpoint
from PoE.core.data import ImageSet, Normalizer
from PoE.core.datasets import get_dataset, load_split
from PoE.core.errors import PoEError
from PoE.core.evaluate import batched_logits
from PoE.core.loaders import Batch, Draw, TensorLoader
from PoE.core.networks import build_network, family_of
from PoE.core.paths import DATA_ROOT_HELP, default_data_root
from PoE.core.runtime import CPU
from PoE.query.pool import Pool

SEED = 0  # the pool's --seed: views are seeded by it, the experts stage's weights and batch order by SEED*100+2
KEYS = {
    "epochs": int,
    "lr": float,
    "batch_size": int,
    "schedule": str,
    "nesterov": lambda v: v == "1",
    "T": float,
    "alpha": float,
    "views": int,
    "db": str,
    "seed": int,
}


def parse_run(text: str) -> tuple[str, dict]:
    """``name:key=value,...`` -> (name, settings); keys: the ones in KEYS."""
    name, _, rest = text.partition(":")
    out = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        if k not in KEYS:
            raise PoEError(f"run {name!r}: unknown key {k!r}; known: {', '.join(KEYS)}")
        out[k] = KEYS[k](v)
    return name, out


class ViewCache:
    """One network's output (fp16) for every training image of one augmented view, computed once, kept on disk:
    the frozen library's features, or the Oracle's logits."""

    def __init__(self, net: nn.Module, key: str, loader: TensorLoader, work: Path) -> None:
        self.net, self.key, self.loader, self.work = net.eval(), key, loader, work
        self.tables: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def view(self, v: int) -> torch.Tensor:
        if v not in self.tables:
            path = self.work / f"{self.key}_n{len(self.loader.data)}_seed{SEED}_view{v:04d}.pt"
            if path.exists():
                self.tables[v] = load_checkpoint(path)["table"]
            else:
                t0 = time.perf_counter()
                self.tables[v] = torch.cat([self.net(b.x).half() for b in self.loader.ordered(v, 500)])
                save_checkpoint(path, {"table": self.tables[v]})
                print(f"{self.key} view {v}: {time.perf_counter() - t0:.0f} s", flush=True)
        return self.tables[v]


def batches(loader: TensorLoader, feats: ViewCache, views: int, seed: int, bs: int):
    """Epoch -> the batches TensorLoader.epoch would draw (same order, same view), as library features."""
    n = len(loader.data)

    def epoch(e: int) -> Iterator[Batch]:
        view = e % views
        table = feats.view(view)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + e))
        for i in range(max(1, n // bs)):
            idx = perm[i * bs : (i + 1) * bs]
            x = table[idx].float().contiguous(memory_format=torch.channels_last)
            yield Batch(x, loader.data.y[idx], idx, view)

    return epoch


def score(net: nn.Module, images: ImageSet, cols: torch.Tensor, norm: Normalizer) -> float:
    pred = torch.cat([o.argmax(1) for o in batched_logits(net.eval(), images.x, norm, CPU)])
    return round(100 * (cols[pred] == images.y).float().mean().item(), 2)


def run_one(name: str, opts: dict, ctx: dict) -> dict:
    """Train and score one expert; resumable (its resume file is under ``--work``)."""
    cfg, work, task = ctx["cfg"], ctx["work"], ctx["task"]
    db = opts.get("db", "DB_PoE")
    if db not in ctx["pools"]:
        ctx["pools"][db] = Pool.open(db)
    library = ctx["pools"][db].library.eval()
    for p in library.parameters():
        p.requires_grad_(False)
    conf: StageConfig = replace(
        PROFILES["cpu"].experts,
        **{k: opts[k] for k in ("epochs", "lr", "batch_size", "schedule", "nesterov") if k in opts},
    )
    T, alpha, views = opts.get("T", 4.0), opts.get("alpha", 0.3), opts.get("views", 6)
    seed = (SEED + opts.get("seed", 0)) * 100 + STAGES.index("experts")  # weights and batch order; views stay
    loader = TensorLoader(ctx["train"], conf.batch_size, ctx["norm"], cfg.crop_pad, "cpu", Draw(seed, SEED))
    lib_id = ctx["pools"][db].part_id()
    caches = ctx["caches"]
    feats = caches.setdefault(lib_id, ViewCache(library, f"library_{lib_id}", loader, work))
    teacher = caches.setdefault("oracle", ViewCache(ctx["oracle"], f"oracle_{ctx['oracle_id']}", loader, work))
    cols = torch.tensor(cfg.tasks[task])
    for v in range(min(views, conf.epochs)):  # every view ready first: epoch times are training alone
        teacher.view(v), feats.view(v)
    seed_everything(seed)
    expert = family_of(cfg).new_expert(library, cfg.networks.expert_width, len(cols))
    expert = expert.to(memory_format=torch.channels_last)

    def loss_fn(b: Batch) -> torch.Tensor:
        return ckd_loss(expert(b.x), teacher.view(b.view)[b.index][:, cols].float(), T, alpha)

    fp = {
        "run": name,
        **opts,
        "lib": lib_id,
        "oracle": ctx["oracle_id"],
        "task": task,
        "config": repr(conf),
        "n": len(loader.data),
    }
    feed = Feed(batches(loader, feats, views, seed, conf.batch_size), len(loader), progress=False)
    hist = train_stage(
        f"expert {name}", {"expert": expert}, loss_fn, feed, conf, CPU, Resume(work / f"resume_{name}.pt", fp)
    )
    net = nn.Sequential(library, expert)
    out = {
        "run": name,
        **opts,
        "epochs": conf.epochs,
        "config": repr(conf),
        "T": T,
        "alpha": alpha,
        "views": views,
        "train_images": len(loader.data),
        "test_acc": score(net, ctx["test"], cols, ctx["norm"]),
        "train_acc": score(net, ctx["train_task"], cols, ctx["norm"]),
        "train_seconds": round(hist["seconds"], 1),
    }
    save_checkpoint(work / f"expert_{name}.pt", {"state_dict": expert.state_dict(), **out})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="people", help="a CIFAR-100 superclass (default: people)")
    p.add_argument("--pretrained", type=Path, required=True, help="holds cifar100/oracle.pt, the teacher (read only)")
    p.add_argument("--work", type=Path, required=True, help="folder for features, resume files, experts, results")
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="NAME:KEY=VALUE,...",
        help=f"runs in order; keys {', '.join(KEYS)} (default: the cpu profile's experts stage, "
        "T 4, alpha 0.3, 6 views, library DB_PoE)",
    )
    p.add_argument(
        "--others",
        type=int,
        default=0,
        help="train on the task's images plus this many others drawn at random (default 0: every training image)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared CPU, two threads wait on each other)",
    )
    return run_main(body, p, None)


def body(a: argparse.Namespace) -> int:
    torch.set_num_threads(a.threads)
    runs = [parse_run(r) for r in a.runs]
    cfg = get_dataset("cifar100")
    a.work.mkdir(parents=True, exist_ok=True)
    train, test = (
        load_split("cifar100", a.data_root, "train", False),
        load_split("cifar100", a.data_root, "test", False),
    )
    cols = torch.tensor(cfg.tasks[a.task])
    keep, keep_tr = torch.isin(test.y, cols), torch.isin(train.y, cols)
    ck = load_checkpoint(a.pretrained / "cifar100" / "oracle.pt")
    oracle = load_into(build_network(ck["arch"], cfg), ck["state_dict"], a.pretrained, "Oracle").float().eval()
    used = torch.arange(len(train.y))
    if a.others:
        others = torch.nonzero(~keep_tr).flatten()
        pick = torch.randperm(len(others), generator=torch.Generator().manual_seed(SEED))[: a.others]
        used = torch.cat([torch.nonzero(keep_tr).flatten(), others[pick]]).sort().values
    ctx = {
        "cfg": cfg,
        "work": a.work,
        "task": a.task,
        "train": ImageSet(train.x[used], train.y[used]),
        "norm": Normalizer(cfg.mean, cfg.std),
        "test": ImageSet(test.x[keep], test.y[keep]),
        "train_task": ImageSet(train.x[keep_tr], train.y[keep_tr]),
        "oracle": oracle,
        "oracle_id": ck["id"],
        "pools": {},
        "caches": {},
    }
    for name, opts in runs:
        res = a.work / f"result_{name}.json"
        if res.exists():
            print(res.read_text().strip())
            continue
        out = run_one(name, opts, ctx)
        res.write_text(json.dumps(out) + "\n")
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
