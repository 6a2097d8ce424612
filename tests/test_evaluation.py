"""Scoring a pool over every combination of n tasks."""

from __future__ import annotations

import json

import pytest
import torch

from PoE.cli import main_evaluation
from PoE.core.evaluate import score_composite
from PoE.core.query import Query


def test_combinations_reproduce_the_original_release(capsys, tmp_path, official_cifar, data_root):
    out = tmp_path / "combos"
    rc = main_evaluation(
        ["--db", str(official_cifar), "--data_root", str(data_root), "--device", "cpu", "--out", str(out), "--json"]
    )
    assert rc == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["n"] for r in rows] == [2, 3, 4, 5]
    assert [r["combinations"] for r in rows] == [15, 20, 15, 6]
    # the means the original code reports for its released pool
    for r, want in zip(rows, [79.03, 76.41, 74.18, 72.22], strict=True):
        assert r["acc_mean"] == pytest.approx(want, abs=0.005)
    # cross-expert errors grow with n, as in the paper's Table 6 (24.71, 37.91, 46.51, 52.75 there)
    shares = [r["cross_expert_error_share"] for r in rows]
    assert shares == sorted(shares) and 20 < shares[0] < 30 and 48 < shares[-1] < 58
    assert (out / "combinations.md").read_text().startswith("| n |")
    assert len((out / "combinations_all.csv").read_text().strip().splitlines()) == 1 + 56


def test_score_composite_by_hand():
    # two experts: A owns classes 3, 1; B owns class 7. Labels 3, 1, 7, 7, 5 (5 is outside: ignored)
    a = torch.tensor([[5.0, 0.0], [0.0, 1.0], [9.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0], [2.0], [3.0], [1.0], [0.0]])
    labels = torch.tensor([3, 1, 7, 7, 5])
    # the columns of a larger consolidated model, in its own order: 7, 3, 1 and class 5 of an expert not queried,
    # whose large logits must not be picked
    other = torch.full((5, 1), 99.0)
    logits = torch.cat([b, a, other], dim=1)
    acc, n, cross, wrong = score_composite(Query(("A", "B"), ((3, 1), (7,))), logits, [7, 3, 1, 5], labels)
    # predictions: 3 (ok), 7 (wrong, cross), 3 (wrong, cross), 7 (ok)
    assert (n, cross, wrong) == (4, 2, 2) and acc == pytest.approx(50.0)


def test_bad_n(capsys, official_cifar):
    assert main_evaluation(["--db", str(official_cifar), "--n", "9", "--device", "cpu"]) == 2
    assert "--n must be between 1 and the number of tasks (6)" in capsys.readouterr().err


def test_experiments_command_writes_tables_and_plots(tmp_path, capsys, monkeypatch, official_cifar, few_train_root):
    """Transfer trains on a tenth of the real training images (its accuracy is not asserted); the Oracle and PoE
    are scored on the whole real test split."""
    from PoE.cli import main_experiments

    from .conftest import install_stand_in_oracle

    install_stand_in_oracle(official_cifar, tmp_path / "pre")
    out = tmp_path / "addImg"
    common = [
        "--db",
        str(official_cifar),
        "--data_root",
        str(few_train_root),
        "--pretrained",
        str(tmp_path / "pre"),
        "--device",
        "cpu",
        "--n",
        "2",
        "--epochs",
        "1",
        "--combos_per_n",
        "1",
        "--out",
        str(out),
        "--no_progress",
    ]
    rc = main_experiments([*common, "--methods", "oracle", "poe", "transfer", "--ablation", f"copy={official_cifar}"])
    assert rc == 0, capsys.readouterr().err
    table = (out / "composite_tasks.md").read_text()
    assert "| oracle | 2 | 15 |" in table and "| poe | 2 | 15 |" in table and "| transfer | 2 | 1 |" in table
    assert "| poe | 2 | 15 | 79.03 |" in table
    for name in ("accuracy_vs_n.png", "accuracy_vs_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cross = (out / "cross_expert_errors.csv").read_text().strip().splitlines()
    assert len(cross) == 1 + 2  # both and copy
    assert "transfer" in (out / "composite_tasks_all.csv").read_text()
    paired = (out / "same_combinations.csv").read_text().strip().splitlines()
    assert paired[0] == "n,tasks,oracle,poe,transfer" and len(paired) == 1 + 1  # one sampled combination

    # every finished baseline run is recorded; a rerun with the same settings trains nothing and gives the same
    # table (an interrupted comparison continues), even with another Oracle in --pretrained (Transfer does not
    # use it; a rerun with nothing changed is the special case of this one); one with other settings trains again
    record = out / "baseline_runs.jsonl"
    assert len(record.read_text().splitlines()) == 1
    from PoE.build.baselines import BaselineRunner
    from PoE.core.checkpoint import load_checkpoint, save_checkpoint

    trained = []
    real_run = BaselineRunner.run
    monkeypatch.setattr(BaselineRunner, "run", lambda self, m, t: trained.append(t) or real_run(self, m, t))
    with open(record, "a") as f:
        f.write('{"key": "cut sh')  # an interrupted append
    oracle = tmp_path / "pre" / "cifar100" / "oracle.pt"
    save_checkpoint(oracle, {**load_checkpoint(oracle), "train_seconds": 1.0})
    rerun = [*common, "--methods", "transfer"]  # Transfer alone: the Oracle's and the pools' scores are not at stake
    capsys.readouterr()
    assert main_experiments(rerun) == 0 and trained == []
    out_text = capsys.readouterr().out
    assert "cross_expert_errors.{md,csv} are an earlier run's" in out_text and "PoE time" not in out_text

    def transfer_rows(text: str) -> list[str]:
        return [line for line in text.splitlines() if line.startswith("| transfer |")]

    assert transfer_rows((out / "composite_tasks.md").read_text()) == transfer_rows(table)
    assert main_experiments([*rerun, "--lr", "0.05"]) == 0 and len(trained) == 1
    capsys.readouterr()
    assert main_experiments([*rerun, "--ablation", f"copy={official_cifar}"]) == 2 and len(trained) == 1
    assert "--ablation compares pools with PoE's cross-expert errors: add poe" in capsys.readouterr().err


def test_record_key_names_the_parts_each_method_uses():
    """A recorded baseline run is reused only while the parts it trained from are unchanged: the library for
    Transfer, CKD and SD/UHC-CKD, the Oracle for CKD, the query's experts for SD/UHC-CKD, none for Scratch."""
    from PoE.build.baselines import METHODS
    from PoE.experiments import record_key

    class Parts:
        def __init__(self, **ids):
            self.ids = ids

        def part_id(self, task):
            return self.ids.get(task or "library", "e0")

    combo = ("people", "vehicles_1")
    base = Parts(library="L0")
    changed = {
        "library": (Parts(library="L1"), "O0"),
        "experts": (Parts(library="L0", people="e1"), "O0"),
        "oracle": (base, "O1"),
    }
    uses = {
        m: {
            part
            for part, (pool, oid) in changed.items()
            if record_key(m, combo, "fp", pool, oid) != record_key(m, combo, "fp", base, "O0")
        }
        for m in METHODS
    }
    assert uses == {
        "scratch": set(),
        "sd_scratch": set(),
        "uhc_scratch": set(),
        "transfer": {"library"},
        "ckd": {"library", "oracle"},
        "sd_ckd": {"library", "experts"},
        "uhc_ckd": {"library", "experts"},
    }
    assert record_key("ckd", combo, "fp", base, "O0") != record_key("ckd", combo, "fp2", base, "O0")


def test_markdown_table_keeps_small_times_visible():
    from PoE.experiments import markdown_table

    text = markdown_table([{"m": "poe", "s": 3.5123e-05}, {"m": "ckd", "s": 54.304}], [("m", "method"), ("s", "s")])
    assert text.splitlines()[2:] == ["| poe | 0.000035 |", "| ckd | 54.30 |"]
