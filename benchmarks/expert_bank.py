"""The expert bank against the per-expert loop it replaces: the experts stage's training step and the inference
of 1-, 3-, 5- and 20-task models, fp32 and bf16, plus the exported graph; interleaved (loop, bank, loop, bank...)
so that both see the same machine, medians over rounds.

    python benchmarks/expert_bank.py --out results/expert_bank.md            # the shipped pool, this CPU
    python benchmarks/expert_bank.py --device cuda --precision fp32 bf16     # on a GPU

On a CPU "bank" runs expert by expert on the bank's tensors (what banks do there) and "bank grouped" the grouped
convolutions a GPU runs. Goals (issue "The expert bank"): on a CPU the 20-task model >= 2x the fp32 loop and the
experts stage >= 1.5x; on an H100/H200 the 20-task model >= 3x the loop.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import PoE.core.networks.bank as bank_module
from PoE.build.losses import ckd_loss
from PoE.build.profiles import PROFILES
from PoE.build.train import make_optimizer
from PoE.core.checkpoint import atomic_write
from PoE.core.consolidate import ConsolidatedNet, SideBySide
from PoE.core.networks import bank_of, family_of
from PoE.core.precision import autocast, cpu_model, resolve
from PoE.query.pool import Pool

QUERIES = {
    1: ["people"],
    3: ["people", "vehicles_1", "vehicles_2"],
    5: ["people", "vehicles_1", "vehicles_2", "small_mammals", "medium-sized_mammals"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def grouped(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with banks forced into grouped convolutions on every device (what a GPU runs)."""

    def run() -> None:
        old, bank_module.GROUPED_ON = bank_module.GROUPED_ON, {"cpu", "cuda"}
        try:
            fn()
        finally:
            bank_module.GROUPED_ON = old

    return run


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each function over ``rounds``, called in turn (A B A B ...) after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def inference_rows(pool: Pool, device: torch.device, precisions: list[str], batch: int, rounds: int) -> list[str]:
    rows = []
    x = torch.randn(batch, 3, pool.cfg.image_size, pool.cfg.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    queries = {**QUERIES, 20: list(pool.experts)}
    for n, tasks in queries.items():
        model = pool.query(tasks)
        loop = ConsolidatedNet(pool.library, SideBySide([pool.experts[t] for t in model.tasks]), model.query).eval()
        fns: dict[str, Callable[[], None]] = {}
        for prec in precisions:
            for name, net in (("loop", loop), ("bank", model.module)):

                def run(net=net, prec=prec) -> None:
                    with torch.no_grad(), autocast(device, prec):
                        net(x)

                fns[f"{name} {prec}"] = run
                if name == "bank" and device.type == "cpu":
                    fns[f"bank grouped {prec}"] = grouped(run)
        if device.type == "cpu":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "m.pt2"
                model.export(path)
                program = torch.export.load(str(path)).module()
                raw = torch.rand(batch, 3, pool.cfg.image_size, pool.cfg.image_size)
                fns["bank exported fp32"] = lambda program=program, raw=raw: program(raw)
        med = interleaved(fns, rounds, device)
        base = med["loop fp32"] if "loop fp32" in med else next(iter(med.values()))
        for k, s in med.items():
            rows.append(f"| {n} | {k} | {batch / s:,.0f} | {base / s:.2f}x |")
    return rows


def stage_rows(pool: Pool, device: torch.device, precisions: list[str], batch: int, rounds: int) -> list[str]:
    """One step of the experts stage: library forward (no grad), all experts forward and backward, SGD."""
    tasks = list(pool.experts)
    family, cfg = family_of(pool.cfg), pool.cfg
    stage = PROFILES["cpu"].experts
    library = pool.library
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device).contiguous(
        memory_format=torch.channels_last
    )
    teacher = torch.randn(batch, cfg.num_classes, device=device) * 4
    cols = [torch.tensor(cfg.tasks[t], device=device) for t in tasks]
    torch.manual_seed(0)
    experts = [family.new_expert(library, cfg.networks.expert_width, len(cfg.tasks[t])).to(device) for t in tasks]
    experts = [e.to(memory_format=torch.channels_last).train() for e in experts]
    bank = bank_of(experts).to(memory_format=torch.channels_last).train()
    sizes = torch.tensor([len(c) for c in cols]).cumsum(0).tolist()
    loop_opt = make_optimizer([p for e in experts for p in e.parameters()], stage)
    bank_opt = make_optimizer(list(bank.parameters()), stage)

    def step(outs: Callable[[torch.Tensor], list[torch.Tensor]], opt: torch.optim.Optimizer, prec: str) -> None:
        with autocast(device, prec):
            with torch.no_grad():
                f = library(x)
            loss = torch.stack(
                [ckd_loss(o, teacher[:, c], 4.0, 10.0) for o, c in zip(outs(f), cols, strict=True)]
            ).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bank_outs(f: torch.Tensor) -> list[torch.Tensor]:
        out = bank(f)
        return [out[:, e - len(c) : e] for c, e in zip(cols, sizes, strict=True)]

    fns = {}
    for prec in precisions:
        fns[f"loop {prec}"] = lambda prec=prec: step(lambda f: [e(f) for e in experts], loop_opt, prec)
        fns[f"bank {prec}"] = lambda prec=prec: step(bank_outs, bank_opt, prec)
        if device.type == "cpu":
            fns[f"bank grouped {prec}"] = grouped(lambda prec=prec: step(bank_outs, bank_opt, prec))
    med = interleaved(fns, rounds, device)
    steps = -(-50_000 // batch)
    rows = []
    for prec in precisions:
        for name in [n for n in ("loop", "bank", "bank grouped") if f"{n} {prec}" in med]:
            s = med[f"{name} {prec}"]
            rows.append(f"| {name} | {prec} | {s * 1e3:.1f} | {s * steps:.1f} | {med[f'loop {prec}'] / s:.2f}x |")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", default="DB_PoE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=512, help="inference batch (default 512)")
    p.add_argument("--train_batch", type=int, default=128, help="training batch of the experts stage (default 128)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per measurement (default 7)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="also write the Markdown tables here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    for prec in a.precision:
        resolve(prec, device)  # bf16 where the device cannot run it: one-line error
    pool = Pool.open(a.db, "cifar100", device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    head = (
        f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load} at the "
        f"start; medians of {a.rounds} interleaved rounds"
    )
    print(head)
    stage = [
        "| experts | precision | ms per step | s per epoch (50,000 images) | speed-up |",
        "| --- | --- | --- | --- | --- |",
    ]
    stage += stage_rows(pool, device, a.precision, a.train_batch, a.rounds)
    print("\n".join(stage))
    inf = ["| tasks | model | images/s | vs loop fp32 |", "| --- | --- | --- | --- |"]
    inf += inference_rows(pool, device, a.precision, a.batch, a.rounds)
    print("\n".join(inf))
    command = "python benchmarks/expert_bank.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"# Expert bank against the per-expert loop\n\n{head}.\n\nExperts stage, all {len(pool.experts)} experts, "
        f"batch {a.train_batch}:\n\n"
        + "\n".join(stage)
        + f"\n\nInference, batch {a.batch}:\n\n"
        + "\n".join(inf)
        + f"\n\n`{command}`\n"
    )
    if a.out:
        atomic_write(a.out, lambda f: f.write(text.encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
