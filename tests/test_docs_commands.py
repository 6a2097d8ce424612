"""Every command in the README and docs/ runs as written, or is visibly a template.

A command is a template when it holds a placeholder in one of the forms the README names: a word in CAPITALS
(``N``, ``POOL``, ``TASK_A``), ``<...>``, ``[...]``, ``...``, a name starting with ``my_``, or a shell variable.
Every other command is checked without running its work: its script's flags parse (the script runs up to its
``parse_args``), and the files and pools it reads exist, in the checkout, in the data folder, or because an
earlier command of the same page writes them. The README's first set-up command runs whole (the query, with no
``--data_root``: the data is where ``scripts/get_test_data.py`` puts it).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from PoE.core.paths import shared_root

from .conftest import ROOT, run_script

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "ImageNet" / "README.md"]
STARTS = ("python", "curl", "pip", "bash", "torchrun", "ImageNet/")
PLACEHOLDER = re.compile(r"(?<![\w/.-])[A-Z][A-Z0-9_]*(?![\w.])|<[^>]*>|\[|\.\.\.|\bmy_\w+|\$\w+|\$\(")
READS = (
    "--db",
    "--hierarchy",
    "--add_tasks",
    "--oracle",
    "--oracle_classes",
    "--library_from",
    "--data_root",
    "--oracle_weights",
    "--library_weights",
    "--ablation",
)
WRITES = ("--db", "--pretrained", "--out", "--to")


def commands(page: Path) -> list[str]:
    """The shell commands of ``page``: in code blocks (``$ `` prompts and comments dropped, continued lines
    joined, ``&&`` chains split) and in inline code spans, in the page's order."""
    text = page.read_text()
    found: list[tuple[int, str]] = []
    for m in re.finditer(r"^```([a-z]*)\n(.*?)^```", text, re.S | re.M):
        if m.group(1) not in ("", "bash", "sh"):
            continue
        for line in re.sub(r"\\\n\s*", " ", m.group(2)).splitlines():
            line = re.sub(r"^\$ ", "", line.strip())
            line = re.sub(r"\s+#.*$", "", line) if not line.startswith("python -c") else line
            found += [(m.start(), part.strip()) for part in line.split(" && ")]
    prose = re.sub(r"^```.*?^```", lambda m: " " * len(m.group(0)), text, flags=re.S | re.M)
    found += [(m.start(), re.sub(r"\s+", " ", m.group(1))) for m in re.finditer(r"`([^`]+)`", prose)]
    found.sort(key=lambda f: f[0])  # stable: a block's lines keep their order
    return [cmd for _, cmd in found if cmd.startswith(STARTS) or re.match(r"[A-Z_]+=\S+ ", cmd)]


def is_template(cmd: str) -> bool:
    return bool(PLACEHOLDER.search(re.sub(r"\b[A-Z_]+=", "", cmd)))  # an environment variable's value counts


class Parsed(BaseException):
    """Raised as soon as a script's flags parsed: the test needs nothing of its work."""


def parse_flags(argv: list[str]) -> None:
    """Run ``python ARGV`` in this process up to its ``parse_args``; a bad flag fails with the script's line."""
    real = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    err = io.StringIO()
    old_argv, old_path = sys.argv[:], sys.path[:]
    try:
        with (
            pytest.MonkeyPatch.context() as mp,
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            mp.setattr(argparse.ArgumentParser, "parse_args", parse_args)
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                sys.argv = argv
                sys.path.insert(0, str(ROOT / Path(argv[0]).parent))
                runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
    except Parsed:
        return
    except SystemExit as e:
        assert not e.code, f"python {shlex.join(argv)}: {err.getvalue().strip()}"
        return  # --help
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    pytest.fail(f"python {shlex.join(argv)} ran without parsing any flags")


def local(path: str) -> Path:
    """A path as a command in the checkout reads it (``../shared`` is the data folder, wherever it is)."""
    if path.startswith("../shared"):
        return shared_root() / path.removeprefix("../shared").lstrip("/")
    return ROOT / path


def reads_and_writes(argv: list[str]) -> tuple[list[str], list[str]]:
    """The paths a script's flags read and write (its first positional argument counts as written)."""
    reads, writes = [], [a for a in argv[1:2] if not a.startswith("-")]
    builds = "Run_preprocessing.py" in argv[0]
    for flag, value in itertools.pairwise(argv):
        if value.startswith("-"):
            continue
        if flag in WRITES:
            writes.append(value)
        if flag in READS and not (flag == "--db" and builds):
            reads.append(value.split("=", 1)[-1])
    if "--ablation" in argv:
        reads += [v.split("=", 1)[1] for v in argv[argv.index("--ablation") + 2 :] if "=" in v]
    return reads, writes


def check(cmd: str, written: list[str]) -> None:
    argv = shlex.split(re.sub(r"^([A-Z_]+=\S+ )+", "", cmd))
    if argv[0] == "torchrun":
        argv = ["python", *[a for a in argv[1:] if not a.startswith("--nproc")]]
    if argv[0] in ("bash", "ImageNet/preprocess.sh", "ImageNet/service.sh", "ImageNet/evaluate.sh"):
        script = argv[1] if argv[0] == "bash" else argv[0]
        assert (ROOT / script).is_file(), f"{cmd}: no {script}"
        return
    if argv[0] == "pip":
        for i, a in enumerate(argv):
            if a == "-r":
                assert (ROOT / argv[i + 1]).is_file(), f"{cmd}: no {argv[i + 1]}"
        return
    if argv[:3] == ["python3", "-m", "venv"]:
        return
    if argv[0] == "curl" or (argv[:2] in (["python", "-c"], ["python", "-m"]) and argv[2:3] == ["pytest"]):
        return  # the service's answers are the server tests'; the test suite runs itself; Python is not flags
    if argv[:2] == ["python", "-c"]:
        return
    assert argv[0] == "python", cmd
    parse_flags(argv[1:])
    reads, writes = reads_and_writes(argv[1:])
    for path in reads:
        made = any(path == w or path.startswith(w.rstrip("/") + "/") for w in written)
        assert made or local(path).exists(), f"{cmd}: {path} is neither in the checkout nor written earlier"
    written += writes


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_runs_as_written_or_is_a_template(page: Path, data_root) -> None:
    found = commands(page)
    written: list[str] = []
    for cmd in found:
        if not is_template(cmd):
            check(cmd, written)
        else:  # what a template writes, later commands of the page may read
            written += reads_and_writes(shlex.split(cmd)[1:])[1] if cmd.startswith("python ") else []


def test_the_commands_are_found() -> None:
    readme = commands(ROOT / "README.md")
    assert "python Run_Service.py --queriedTask people vehicles_1 vehicles_2" in readme
    assert "python Run_Service.py --db DB_own/cifar100_alphabetical --list" in readme
    assert is_template("python Run_Service.py --dataset folder --db DB_mine --data_root my_images --queriedTask A")
    assert not is_template("python Run_Service.py --db DB_own/cifar100_alphabetical --list")
    with pytest.raises(AssertionError, match="is neither in the checkout"):
        check("python Run_Service.py --db DB_own --list --data_root nowhere", [])
    with pytest.raises(AssertionError, match="unrecognized arguments"):
        check("python Run_Service.py --no_such_flag", [])


def test_the_readme_query_runs_as_written_with_no_data_root(data_root) -> None:
    """The first set-up command's query, verbatim: the data is found where get_test_data.py puts it."""
    setup = re.search(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M).group(1)
    query = setup.splitlines()[0].split(" && ")[-1]
    assert query == "python Run_Service.py --queriedTask people vehicles_1 vehicles_2"
    r = run_script(*shlex.split(query)[1:])
    assert r.returncode == 0, r.stderr
    assert "73.00% on 1500 test images" in r.stdout


@pytest.mark.parametrize("script", ["preprocess.sh", "service.sh", "evaluate.sh"])
def test_the_imagenet_scripts_read_the_default_data_folder_unless_data_root_is_given(script, tmp_path) -> None:
    import os
    import subprocess

    fake = tmp_path / "python"  # stands in for the interpreter: prints the arguments the script passes, one a line
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "DATA_ROOT"}
    env["PATH"] = f"{tmp_path}:{env['PATH']}"

    def passed(env: dict[str, str]) -> list[str]:
        r = subprocess.run(["bash", f"ImageNet/{script}", "x"], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    assert "--data_root" not in passed(env)  # the entry script's default: the one data folder
    given = passed({**env, "DATA_ROOT": "/some where"})
    assert given[given.index("--data_root") + 1] == "/some where"


def test_the_comparisons_write_to_an_untracked_folder_unless_told_otherwise() -> None:
    """Run_Experiments.py and Run_Evaluation.py never rewrite the shipped tables (addImg/, results/) by default."""
    import shutil
    import subprocess

    from PoE.cli.evaluation import evaluation_parser
    from PoE.cli.experiments import experiments_parser

    assert evaluation_parser().get_default("out") is None  # writes only with --out
    out = experiments_parser().get_default("out")
    assert not out.startswith(("addImg", "results"))
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", f"{out}/composite_tasks.md"], cwd=ROOT)
    assert r.returncode == 0, f"{out}/ is not ignored by git"
