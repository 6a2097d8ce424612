"""Tasks added to and removed from a built pool in place, on real CIFAR-100: an add trains only the new expert and
leaves every other file byte-identical; a remove deletes the expert; killed with SIGKILL between a file and the
manifest, the pool opens as the old one (the stray file ignored with a note) and the command run again completes
it; a running server picks the changes up without a restart and never lists a half-added expert."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from PoE.cli import main_preprocessing, main_service
from PoE.query.pool import Pool

from .conftest import ROOT, TINY, install_stand_in_oracle

FIRST = {"aquatic": ["beaver", "dolphin"], "land": ["bear", "camel"]}
MORE = {"wheels": ["bicycle", "motorcycle", "pickup_truck"]}
# a real SIGKILL at a point the test chooses: the add's first manifest write is its commit (nothing before it)
KILL = """
import os, signal, sys
from PoE.core import manifest
when, argv, write = sys.argv[1], sys.argv[2:], manifest.write
def killed(listing, run):
    if when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    write(listing, run)
    os.kill(os.getpid(), signal.SIGKILL)
manifest.write = killed
from PoE.cli import main_preprocessing
sys.exit(main_preprocessing(argv))
"""


def files(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) -> its sha256."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory, official_cifar, data_root) -> dict:
    """A pool of two tasks on the original release's library (1 epoch, 256 images), and the add's arguments."""
    base = tmp_path_factory.mktemp("inplace")
    pre, src = base / "pre", base / "src"
    install_stand_in_oracle(official_cifar, pre, src)
    argv = [a for a in TINY if a not in ("--tasks", "people", "vehicles_1", "vehicles_2")]
    argv += ["--data_root", str(data_root), "--pretrained", str(pre), "--train_limit", "256", "--epochs", "1"]
    (base / "first.json").write_text(json.dumps(FIRST))
    (base / "more.json").write_text(json.dumps(MORE))
    first = [*argv, "--db", str(base / "db"), "--library_from", str(src), "--stages", "experts"]
    assert main_preprocessing([*first, "--hierarchy", str(base / "first.json")]) == 0
    return {"base": base, "argv": argv, "pool": base / "db" / "cifar100", "more": base / "more.json"}


@pytest.fixture
def pool_dir(built, tmp_path) -> Path:
    """A fresh copy of the built pool (``tmp/db/cifar100``)."""
    shutil.copytree(built["pool"], tmp_path / "db" / "cifar100")
    return tmp_path / "db" / "cifar100"


def add(built, pool_dir: Path, *extra: str) -> list[str]:
    return [*built["argv"], "--db", str(pool_dir.parent), "--add_tasks", str(built["more"]), *extra]


def logits(root: Path, tasks: list[str]) -> torch.Tensor:
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return Pool.open(root).query(tasks).logits(x)


def killed(when: str, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILL, when, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_add_trains_only_the_new_expert_and_leaves_every_other_file(built, pool_dir, capsys):
    before, old = files(pool_dir), logits(pool_dir, ["aquatic", "land"])
    cache = {p.name: p.stat().st_mtime_ns for p in (built["base"] / "pre" / "cifar100" / "cache").iterdir()}
    capsys.readouterr()
    assert main_preprocessing(add(built, pool_dir)) == 0
    out = capsys.readouterr().out
    assert "[experts] epoch 1/1" in out and "expert wheels" in out and "teacher logits computed: 0s" in out
    assert "[library]" not in out and "[oracle]" not in out and "expert aquatic" not in out  # only the new one
    after = files(pool_dir)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed == {"manifest.json", "hierarchy.json", "experts/expert_wheels.pt"}, changed
    assert set(before) <= set(after)  # nothing else written, nothing removed
    assert {p.name: p.stat().st_mtime_ns for p in (built["base"] / "pre" / "cifar100" / "cache").iterdir()} == cache
    pool = Pool.open(pool_dir)
    assert list(pool.cfg.tasks) == ["aquatic", "land", "wheels"] and pool.notes == []
    assert pool.query(["wheels"]).class_names == ["bicycle", "motorcycle", "pickup_truck"]
    assert torch.equal(logits(pool_dir, ["aquatic", "land"]), old)  # the old experts, as they were
    manifest = json.loads((pool_dir / "manifest.json").read_text())
    assert manifest["hierarchy"]["tasks"]["wheels"] == ["bicycle", "motorcycle", "pickup_truck"]
    assert manifest["edits"][-1]["added"] == ["wheels"]
    assert json.loads((pool_dir / "hierarchy.json").read_text())["id"] == manifest["hierarchy"]["id"]

    # the same file again: nothing to add, nothing written
    assert main_preprocessing(add(built, pool_dir)) == 0
    assert "nothing to add" in capsys.readouterr().out and files(pool_dir) == after


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"land": ["bear"]}, "task 'land' is in the pool "),
        ({"seas": ["dolphin", "whale"]}, "class 'dolphin' of task 'seas' is in the pool's task 'aquatic'"),
    ],
)
def test_an_add_that_changes_a_task_is_refused_saying_how_to_remove_it(built, pool_dir, capsys, content, message):
    bad = pool_dir.parent / "bad.json"
    bad.write_text(json.dumps(content))
    before = files(pool_dir)
    argv = [*built["argv"], "--db", str(pool_dir.parent), "--add_tasks", str(bad)]
    assert main_preprocessing(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "--remove_tasks" in err
    assert files(pool_dir) == before


def test_a_bigger_hierarchy_is_refused_pointing_to_add_tasks(built, pool_dir, capsys):
    more = pool_dir.parent / "all.json"
    more.write_text(json.dumps({**FIRST, **MORE}))
    argv = [*built["argv"], "--db", str(pool_dir.parent), "--stages", "experts", "--hierarchy", str(more)]
    assert main_preprocessing(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "to add its task(s) wheels to this pool, give the file with --add_tasks" in err


def test_add_killed_before_its_manifest_opens_as_the_old_pool_then_completes(built, pool_dir, capsys):
    before, old = files(pool_dir), logits(pool_dir, ["aquatic", "land"])
    run = killed("before", add(built, pool_dir))
    assert run.returncode == -9, run.stderr[-2000:]
    after = files(pool_dir)
    assert set(after) - set(before) == {"experts/expert_wheels.pt"}  # written, not committed
    assert {k: after[k] for k in before} == before  # the manifest and hierarchy.json as they were
    pool = Pool.open(pool_dir)
    assert list(pool.cfg.tasks) == ["aquatic", "land"] and "wheels" not in pool.experts
    assert torch.equal(logits(pool_dir, ["aquatic", "land"]), old)
    assert len(pool.notes) == 1 and "expert_wheels.pt is ignored" in pool.notes[0]
    assert "running the command again" in pool.notes[0]
    assert main_service(["--db", str(pool_dir.parent), "--list"]) == 0
    assert "note: " in capsys.readouterr().out
    assert main_service(["--db", str(pool_dir.parent), "--queriedTask", "wheels", "--no_eval"]) == 2
    assert "unknown task 'wheels'" in capsys.readouterr().err  # never answered from the stray file

    assert main_preprocessing(add(built, pool_dir)) == 0  # run again: it completes
    pool = Pool.open(pool_dir)
    assert list(pool.cfg.tasks) == ["aquatic", "land", "wheels"] and pool.notes == []


def test_remove_writes_the_manifest_first_then_deletes_and_survives_a_kill(built, pool_dir, capsys):
    old = logits(pool_dir, ["aquatic"])
    db = str(pool_dir.parent)
    assert main_preprocessing(["--db", db, "--remove_tasks", "lnad"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'lnad' is not a task of the pool" in err and "closest: land" in err
    assert main_preprocessing(["--db", db, "--remove_tasks", "land", "--tasks", "aquatic"]) == 2  # not ignored
    assert "--tasks and --retrain do not go with it" in capsys.readouterr().err

    run = killed("after", ["--db", db, "--remove_tasks", "land"])  # killed after the commit, before the deletion
    assert run.returncode == -9, run.stderr[-2000:]
    assert (pool_dir / "experts" / "expert_land.pt").is_file()
    pool = Pool.open(pool_dir)
    assert list(pool.cfg.tasks) == ["aquatic"] and list(pool.experts) == ["aquatic"]
    assert any("expert_land.pt is ignored" in n for n in pool.notes)
    assert any("hierarchy.json" in n for n in pool.notes)  # the readable copy is behind the manifest: said so
    assert torch.equal(logits(pool_dir, ["aquatic"]), old)

    assert main_preprocessing(["--db", db, "--remove_tasks", "land"]) == 0  # run again: it completes
    assert "deleted" in capsys.readouterr().out
    assert not (pool_dir / "experts" / "expert_land.pt").exists()
    pool = Pool.open(pool_dir)
    assert pool.notes == [] and json.loads((pool_dir / "hierarchy.json").read_text())["tasks"] == {
        "aquatic": ["beaver", "dolphin"]
    }
    assert main_preprocessing(["--db", db, "--remove_tasks", "aquatic"]) == 2  # the last task stays
    assert "without tasks" in capsys.readouterr().err


def test_a_running_server_picks_up_added_and_removed_experts(built, pool_dir, data_root, tmp_path):
    from .servers import Server

    stray = pool_dir / "experts" / "expert_ghost.pt"
    args = ("--db", str(pool_dir.parent), "--port", "0", "--workers", "2")
    server = Server(*args, data_root=data_root, logs=tmp_path).ready()
    try:

        def every_worker(path: str, want) -> list[dict]:
            """GET ``path`` on new connections until both workers answered; each answer must satisfy ``want``."""
            seen, answers, deadline = set(), [], time.monotonic() + 240
            while len(seen) < 2 and time.monotonic() < deadline:
                health = server.get("/healthz")
                if health.status_code != 200:
                    time.sleep(0.2)
                    continue
                seen.add(health.json()["pid"])
                got = server.get(path).json()
                assert want(got), got
                answers.append(got)
            assert len(seen) == 2
            return answers

        def names(info: dict) -> list[str]:
            return [t["name"] for t in info["tasks"]]

        every_worker("/api/pool", lambda info: names(info) == ["aquatic", "land"])
        shutil.copy(pool_dir / "experts" / "expert_land.pt", stray)  # a half-added file: never listed
        assert main_preprocessing(add(built, pool_dir)) == 0
        every_worker("/api/pool", lambda info: names(info) == ["aquatic", "land", "wheels"] and info["notes"])
        with httpx.Client(timeout=60) as c:
            r = c.post(server.url + "/api/query", json={"tasks": ["wheels", "land"]})
            assert r.status_code == 200, r.text
            assert [k["name"] for k in r.json()["classes"]] == [
                "bear",
                "bicycle",
                "camel",
                "motorcycle",
                "pickup_truck",
            ]
        assert main_preprocessing(["--db", str(pool_dir.parent), "--remove_tasks", "land", "ghost"]) == 0
        every_worker("/api/pool", lambda info: names(info) == ["aquatic", "wheels"] and not info["notes"])
        with httpx.Client(timeout=60) as c:
            r = c.post(server.url + "/api/query", json={"tasks": ["land"]})
            assert r.status_code == 400 and "unknown task 'land'" in r.json()["error"]
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("name", ["bak/../../../../../victim/model", "bak/../expert_land"])
def test_a_remove_never_deletes_a_file_its_name_leads_to_outside_the_pool(built, pool_dir, capsys, name):
    """The name is checked where the path is made: with a folder ``experts/expert_bak/`` present, a name through it
    resolved to a file outside the pool (deleted, exit 0) or to another task's expert (the manifest then listed a
    file that was gone)."""
    (pool_dir / "experts" / "expert_bak").mkdir()
    victim = pool_dir.parents[2] / "victim" / "model.pt"  # five levels up from experts/expert_bak
    victim.parent.mkdir(exist_ok=True)
    victim.write_bytes(b"not the pool's")
    before = files(pool_dir)
    assert main_preprocessing(["--db", str(pool_dir.parent), "--remove_tasks", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{name!r} is not a task name" in err
    assert victim.read_bytes() == b"not the pool's" and files(pool_dir) == before
    assert list(Pool.open(pool_dir).experts) == ["aquatic", "land"]


def test_a_pool_path_is_made_only_of_a_task_name_and_stays_in_the_pool(tmp_path):
    from PoE.core.errors import PoEError
    from PoE.core.pool_paths import PoolPaths

    paths = PoolPaths(tmp_path / "pool", "cifar100")
    assert paths.expert("vehicles_1") == tmp_path / "pool" / "experts" / "expert_vehicles_1.pt"
    for bad in ("../x", "a/b", "a\\b", "bak/../land", "a..b", "", ".hidden", "x" * 101):
        with pytest.raises(PoEError, match="is not a task name"):
            paths.expert(bad)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "pool").mkdir()
    (tmp_path / "pool" / "experts").symlink_to(tmp_path / "elsewhere")  # a symlinked experts/ leads outside
    with pytest.raises(PoEError, match="outside the pool's experts/ folder"):
        paths.expert("people")


def test_a_retrain_beside_another_writer_is_refused_at_once(built, pool_dir, capsys):
    """Every command that writes a pool takes its lock: a retrain beside an add (which holds it) rewrote the
    manifest from what it read at its start, and the added tasks vanished."""
    from PoE.build.edit import editing

    before = files(pool_dir)
    retrain = [*built["argv"], "--db", str(pool_dir.parent), "--stages", "experts", "--retrain", "experts"]
    with editing(pool_dir):  # another command (an add) is writing the pool
        assert main_preprocessing(retrain) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "another command is writing the pool" in err
        from PoE.build.migrate import main as migrate

        assert migrate([str(pool_dir)]) == 2
        assert "another command is writing the pool" in capsys.readouterr().err
    assert files(pool_dir) == before


def test_a_remove_killed_after_deleting_is_finished_by_running_it_again(built, pool_dir, capsys, monkeypatch):
    """The state a kill leaves after the commit and the deletion, before ``hierarchy.json``: the note says to run the
    command again, and running it again finishes the edit (it was refused: the task was no longer in the pool)."""
    import PoE.build.edit

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the SIGKILL: nothing after this point runs

    db = str(pool_dir.parent)
    monkeypatch.setattr(PoE.build.edit, "write_copy", killed)
    assert main_preprocessing(["--db", db, "--remove_tasks", "land"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert not (pool_dir / "experts" / "expert_land.pt").exists()  # committed and deleted; the copy is behind
    pool = Pool.open(pool_dir)
    assert list(pool.cfg.tasks) == ["aquatic"] and any("hierarchy.json" in n for n in pool.notes)

    assert main_preprocessing(["--db", db, "--remove_tasks", "land"]) == 0  # run again: it finishes
    assert "'land' was removed already" in capsys.readouterr().out
    pool = Pool.open(pool_dir)
    assert pool.notes == [] and list(pool.cfg.tasks) == ["aquatic"]
    assert json.loads((pool_dir / "hierarchy.json").read_text())["tasks"] == {"aquatic": ["beaver", "dolphin"]}
    assert main_preprocessing(["--db", db, "--remove_tasks", "lnad"]) == 2  # an unknown name is still refused
    assert "'lnad' is not a task of the pool" in capsys.readouterr().err


def test_a_pinned_remove_changes_only_the_pinned_pool(built, pool_dir, capsys):
    db, digest = str(pool_dir.parent), Pool.open(pool_dir).digest
    other = "0" * 64
    assert main_preprocessing(["--db", db, "--remove_tasks", "land", "--pool_digest", other]) == 2
    assert f"not the pinned {other}" in capsys.readouterr().err and (pool_dir / "experts" / "expert_land.pt").exists()
    assert main_preprocessing(["--db", db, "--remove_tasks", "land", "--pool_digest", digest]) == 0
    assert Pool.open(pool_dir).digest != digest  # the edit made a new pool


def test_an_add_killed_after_its_commit_is_finished_by_running_it_again(built, pool_dir, capsys, monkeypatch):
    import PoE.build.preprocess.record

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the SIGKILL after the manifest, before hierarchy.json

    monkeypatch.setattr(PoE.build.preprocess.record, "write_copy", killed)
    assert main_preprocessing(add(built, pool_dir)) == 130
    monkeypatch.undo()
    pool = Pool.open(pool_dir)
    assert "wheels" in pool.experts and any("hierarchy.json" in n for n in pool.notes)  # committed; the copy behind
    capsys.readouterr()
    assert main_preprocessing(add(built, pool_dir)) == 0  # run again: nothing to train, the edit finished
    assert "nothing to add" in capsys.readouterr().out
    assert Pool.open(pool_dir).notes == []
