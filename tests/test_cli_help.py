"""``--help`` of every entry script: answered without importing torch (it took seconds), naming the built-in
datasets' tasks and the defaults; the paper profile says what it costs on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPTS = ["Run_preprocessing.py", "Run_Service.py", "Run_Evaluation.py", "Run_Baselines.py", "Run_Experiments.py"]

# each script's --help in one process, as a user runs it, then which heavy modules that process had imported
PROBE = """
import contextlib, io, json, runpy, sys
out = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        runpy.run_path(script, run_name="__main__")
    out[script] = buf.getvalue()
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "numpy"))
print(json.dumps({"help": out, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def helps() -> dict:
    r = subprocess.run([sys.executable, "-c", PROBE, *SCRIPTS], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_help_imports_no_torch(helps):
    assert not [m for m in helps["heavy"] if m.split(".")[0] in ("torch", "torchvision")], helps["heavy"][:5]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_the_tasks(helps, script):
    text = " ".join(helps["help"][script].split())  # unwrapped
    assert text.startswith(f"usage: {script}")
    for listed in ("cifar100 tasks (20): aquatic_mammals, fish,", "vehicles_1, vehicles_2", "tinyimagenet tasks (34)"):
        assert listed in text


def test_help_shows_the_defaults(helps):
    pre = " ".join(helps["help"]["Run_preprocessing.py"].split())
    assert "epochs of every stage (default: the profile's: paper 200 / 200 / 100, quick 1, gpu 80 / 40 / 15" in pre
    assert "distillation temperature (default: the profile's: 4.0 in every profile)" in pre
    assert "weight of L_scale (default: the profile's: 0.3 in every profile)" in pre
    assert "batch size of every stage (default: the profile's: paper 512, quick 256, gpu 512, cpu 256, smoke" in pre
    assert "would run for days on a CPU" in pre and "use --profile cpu" in pre
    base = " ".join(helps["help"]["Run_Baselines.py"].split())
    for shown in ("(default: 4.0)", "(default: 0.3)", "batch size (default: 512)", "200 for scratch, sd, uhc"):
        assert shown in base
    ev = " ".join(helps["help"]["Run_Evaluation.py"].split())
    assert "cifar100 default tasks: large_omnivores_and_herbivores medium-sized_mammals people" in ev


def test_paper_profile_on_a_cpu_warns_at_start(tmp_path, capsys):
    from PoE.cli import main_preprocessing

    # no data there: the run stops at once, after the warning
    argv = [
        "--dataset",
        "tinyimagenet",
        "--device",
        "cpu",
        "--data_root",
        str(tmp_path),
        "--db",
        str(tmp_path / "db"),
        "--pretrained",
        str(tmp_path / "pre"),
        "--no_progress",
    ]
    assert main_preprocessing(argv) == 2
    out, err = capsys.readouterr()
    warning = out.splitlines()[0]  # before anything else (the run's first line comes when a part is made)
    assert warning.startswith("warning: the paper profile (the default) would run for days on a CPU")
    assert "--profile cpu" in warning and err.startswith("error: no Tiny-ImageNet folder") and err.count("\n") == 1
    assert main_preprocessing([*argv, "--profile", "cpu"]) == 2
    assert "warning" not in capsys.readouterr().out
