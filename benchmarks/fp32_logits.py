"""One process's worth of bf16 inference of the 20-task model on the 10,000 CIFAR-100 test images (3 passes), with
the experts' last linear layer in fp32 (as shipped) or, for comparison, in bf16. Timed from outside, A B A B:

    farm-bench -n 5 --timeout 600 \\
        --vs "python benchmarks/fp32_logits.py --last_layer bf16 --data_root ../shared/data" \\
        -- python benchmarks/fp32_logits.py --last_layer fp32 --data_root ../shared/data
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.core.datasets import load_split
from PoE.core.networks.wrn import WRNExpert
from PoE.core.paths import DATA_ROOT_HELP, default_data_root
from PoE.query.pool import Pool


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--last_layer", choices=("fp32", "bf16"), default="fp32", help="precision of the experts' fc")
    p.add_argument("--data_root", default=str(default_data_root()), help=f"folder holding cifar100/ ({DATA_ROOT_HELP})")
    p.add_argument("--db", default="DB_PoE", help="pool root (default: DB_PoE)")
    a = p.parse_args()
    if a.last_layer == "bf16":  # the expert as it was before fp32_linear: fc under autocast like the rest

        def forward(self: WRNExpert, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.adaptive_avg_pool2d(F.relu(self.bn1(self.block3(x))), 1).flatten(1))

        WRNExpert.forward = forward
    test = load_split("cifar100", a.data_root, "test", progress=False)
    pool = Pool.open(a.db, precision="bf16")
    model = pool.query(list(pool.cfg.tasks))
    x = test.x.float() / 255
    with torch.no_grad():
        for _ in range(3):
            model.logits(x)


if __name__ == "__main__":
    main()
