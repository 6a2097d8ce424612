"""Seconds per epoch of each preprocessing stage, and the projected time of whole profiles.

Runs the real preprocessing code (``Run_preprocessing.py``) for two epochs per stage on a generated
CIFAR-shaped data folder (the speed of a step does not depend on what the pixels are), takes the
second epoch of each stage (the first pays for cuDNN plans and compilation), and scales it to the
50,000 training images of CIFAR-100. Each row is one setting; the projection multiplies by the
profile's epochs and adds its cached teacher views.

    python benchmarks/stage_speed.py --device cuda --profile gpu paper --precision bf16
    python benchmarks/stage_speed.py --device cuda --profile gpu --compile off oracle --stages oracle
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PoE.build.preprocess import STAGES
from PoE.build.profiles import PROFILES
from PoE.cli import main_preprocessing

FULL = 50_000  # CIFAR-100 training images


def make_data(root: Path, n_train: int, n_test: int) -> None:
    rng = np.random.default_rng(0)
    folder = root / "cifar100"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", x=x, y=np.arange(n) % 100)


def measure(profile: str, precision: str, compile_: str, stages: list[str], args: argparse.Namespace) -> dict:
    prof = PROFILES[profile]
    batch = prof.oracle.batch_size
    n = batch * args.steps
    views = min(prof.teacher_views, 2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_data(root / "data", n, args.test_images)
        argv = [
            "--profile",
            profile,
            "--epochs",
            "2",
            "--teacher_views",
            str(views),
            "--precision",
            precision,
            "--compile",
            compile_,
            "--device",
            args.device,
            "--no_progress",
            "--stages",
            *stages,
            "--data_root",
            str(root / "data"),
            "--db",
            str(root / "db"),
            "--pretrained",
            str(root / "pre"),
        ]
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            rc = main_preprocessing(argv)
        wall = time.perf_counter() - t0
        if rc != 0:
            raise SystemExit(f"preprocessing failed ({rc}):\n{out.getvalue()[-3000:]}")
        if "experts" in stages or "library" in stages:
            manifest = json.loads((root / "db" / "cifar100" / "manifest.json").read_text())
            epochs, seconds = manifest["stage_epoch_seconds"], manifest["stage_seconds"]
        else:
            import torch

            meta = torch.load(root / "pre" / "cifar100" / "oracle.pt", weights_only=True)
            epochs, seconds = {"oracle": meta["epoch_seconds"]}, {}
    scale = FULL / n
    row = {"profile": profile, "precision": precision, "compile": compile_, "wall_s": round(wall, 1)}
    for stage in stages:
        first, second = epochs[stage][0], epochs[stage][1]
        row[f"{stage}_s_per_epoch"] = round(second * scale, 2)
        row[f"{stage}_first_epoch_extra_s"] = round(first - second, 1)  # compilation, cuDNN plans
    if views and "teacher_logits" in seconds:
        row["teacher_s_per_view"] = round(seconds["teacher_logits"] / views * scale, 2)
    if all(f"{s}_s_per_epoch" in row for s in STAGES):
        total = sum(getattr(prof, s).epochs * row[f"{s}_s_per_epoch"] for s in STAGES)
        total += prof.teacher_views * row.get("teacher_s_per_view", 0.0)
        row["projected_total_s"] = round(total, 0)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile", nargs="+", default=["gpu", "paper"], choices=list(PROFILES))
    p.add_argument("--precision", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", default=["off"], help="values of Run_preprocessing's --compile to try")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--steps", type=int, default=24, help="training steps per measured epoch")
    p.add_argument("--test_images", type=int, default=1000)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    rows = []
    for profile in args.profile:
        for precision in args.precision:
            for compile_ in args.compile:
                rows.append(measure(profile, precision, compile_, args.stages, args))
                print(json.dumps(rows[-1]), flush=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in keys) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
