"""Training steps of a WRN at a precision, as the training loop runs them (channels_last, SGD, autocast):
one process per precision, so two of them can be timed against each other as whole processes.

    python benchmarks/train_step.py --arch wrn-16-2 --precision bf16 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.networks import WideResNet, WRNSpec
from PoE.core.precision import PRECISIONS, autocast, resolve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="wrn-16-2")
    p.add_argument("--precision", default="bf16", choices=PRECISIONS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.manual_seed(0)
    device = torch.device(a.device)
    precision = resolve(a.precision, device)
    model = WideResNet(WRNSpec.parse(a.arch), 100).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(a.batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (a.batch,), device=device)

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(2):  # oneDNN primitive caches
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    seconds = time.perf_counter() - t0
    print(f"{a.arch} {precision} batch {a.batch}: {a.batch * a.steps / seconds:.0f} img/s over {a.steps} steps")


if __name__ == "__main__":
    main()
