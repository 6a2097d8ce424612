"""Task hierarchies as files: validation, a pool that stores its hierarchy, and a new hierarchy trained on an
existing library (only its experts), on real CIFAR-100."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from PoE.cli import main_evaluation, main_preprocessing, main_service
from PoE.core.datasets import get_dataset
from PoE.core.errors import PoEError
from PoE.core.store import load_checkpoint
from PoE.core.tasks import Hierarchy
from PoE.query.pool import Pool

from .conftest import ROOT, TINY, install_stand_in_oracle

SHIPPED = ROOT / "DB_PoE"
# not the superclasses: classes grouped by their id's position, one task mixing superclasses, one pair
OWN = {
    "first": ["apple", "aquarium_fish", "baby", "bear", "beaver"],
    "mixed": ["rocket", "rose", "whale"],
    "pair": ["tank", "tiger"],
}


def write(tmp_path: Path, content: object, name: str = "h.json") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": ["apple",]}', "not JSON (Expecting value at line 1 column 16)"),
        ('["apple"]', "expected a JSON object"),
        ("{}", "it names no task"),
        ({"a": ["aple"]}, "unknown cifar100 class 'aple' (closest: apple, "),
        ({"a": ["apple"], "b": ["pear", "apple"]}, "class 'apple' is in both task 'a' and task 'b'"),
        ({"a": []}, "task 'a' is empty"),
        ('{"a": ["apple"], "a": ["pear"]}', "task 'a' is given twice"),
        ({"a": "apple"}, "task 'a' must be a list of class names, got a string"),
        ({"a": [3]}, "class names are strings, got a number 3"),
        ({"a": ["apple", "apple"]}, "task 'a' names class 'apple' twice"),
        ({"../x": ["apple"]}, "task name '../x' is not accepted"),
        ({"dataset": "tinyimagenet", "tasks": {"a": ["apple"]}}, "a hierarchy of tinyimagenet, not of cifar100"),
    ],
)
def test_bad_hierarchy_files_are_one_line_errors_exit_2(tmp_path, capsys, content, message):
    path = write(tmp_path, content)
    with pytest.raises(PoEError) as e:
        Hierarchy.read(path, get_dataset("cifar100"))
    assert message in str(e.value) and str(path) in str(e.value)
    capsys.readouterr()
    assert main_service(["--db", str(SHIPPED), "--list", "--hierarchy", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: hierarchy ") and message in err


def test_missing_hierarchy_file(tmp_path, capsys):
    assert main_evaluation(["--db", str(SHIPPED), "--hierarchy", str(tmp_path / "no.json")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_hierarchy_id_is_its_content_and_builtin_tasks_are_unchanged():
    cfg = get_dataset("cifar100")
    a = Hierarchy.parse(OWN, cfg, "a")
    b = Hierarchy.parse({k: list(reversed(v)) for k, v in reversed(OWN.items())}, cfg, "b")
    assert a.id == b.id and a.tasks["pair"] == [85, 88]  # class ids ascending, whatever the file's order
    assert Hierarchy.parse({**OWN, "pair": ["tank"]}, cfg, "c").id != a.id
    assert Hierarchy.builtin_of(cfg).apply(cfg) is cfg  # a pool without a stored hierarchy: the dataset's tasks
    own = a.apply(cfg)
    assert list(own.tasks) == ["first", "mixed", "pair"] and own.default_tasks == ["first", "mixed", "pair"]
    assert next(iter(cfg.tasks)) == "aquatic_mammals"  # the registry's table is untouched


def test_shipped_pool_refuses_another_hierarchy_accepts_its_own(tmp_path, capsys):
    own = write(tmp_path, OWN)
    assert main_service(["--db", str(SHIPPED), "--list", "--hierarchy", str(own)]) == 2
    err = capsys.readouterr().err
    assert "built with the built-in tasks of cifar100" in err and err.count("\n") == 1
    cfg = get_dataset("cifar100")
    names = {t: [cfg.class_name(c) for c in cls] for t, cls in cfg.tasks.items()}
    assert main_service(["--db", str(SHIPPED), "--list", "--hierarchy", str(write(tmp_path, names, "b.json"))]) == 0


def test_new_hierarchy_on_an_existing_library_trains_only_its_experts(official_cifar, data_root, tmp_path, capsys):
    pre, src = tmp_path / "pre", tmp_path / "src"
    install_stand_in_oracle(official_cifar, pre, src)  # an Oracle, its library student and a pool's library
    source_files = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    argv = [a for a in TINY if a not in ("--tasks", "people", "vehicles_1", "vehicles_2")]
    argv += [
        "--data_root",
        str(data_root),
        "--pretrained",
        str(pre),
        "--train_limit",
        "512",
        "--epochs",
        "1",
        "--library_from",
        str(src),
        "--stages",
        "experts",
    ]
    first = write(tmp_path, {"aquatic": ["beaver", "dolphin"], "land": ["bear"]}, "first.json")
    assert main_preprocessing([*argv, "--db", str(tmp_path / "first"), "--hierarchy", str(first)]) == 0
    cache = pre / "cifar100" / "cache"
    cached = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    own, db = write(tmp_path, OWN), tmp_path / "own"
    capsys.readouterr()
    rc = main_preprocessing([*argv, "--db", str(db), "--hierarchy", str(own)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "expert first" in out and "expert pair" in out and "teacher logits computed: 0s" in out
    assert "[experts] epoch 1/1" in out and "[library]" not in out and "[oracle]" not in out  # only experts train
    pool = db / "cifar100"
    assert sorted(p.name for p in (pool / "experts").iterdir()) == [
        "expert_first.pt",
        "expert_mixed.pt",
        "expert_pair.pt",
    ]
    stored = json.loads((pool / "hierarchy.json").read_text())
    assert stored["tasks"]["pair"] == ["tank", "tiger"]
    assert stored["id"] == Hierarchy.read(own, get_dataset("cifar100")).id
    ids = [load_checkpoint(p / "library_cifar100.pt")["id"] for p in (pool, src / "cifar100")]
    assert ids[0] == ids[1]  # the same library (its weights' hash), listed in the new pool's manifest
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == source_files
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == cached  # the Oracle's logits were reused

    # later commands read the pool's hierarchy; the same one may be named, another is refused in one line
    assert main_service(["--db", str(db), "--list"]) == 0
    listing = capsys.readouterr().out
    assert "3 of 3 experts present" in listing and "85 tank, 88 tiger" in listing
    q = ["--db", str(db), "--data_root", str(data_root), "--device", "cpu", "--json", "--queriedTask", "first", "pair"]
    assert main_service([*q, "--hierarchy", str(own)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["classes"] == [0, 1, 2, 3, 4, 85, 88] and result["n_test"] == 700
    other = write(tmp_path, {**OWN, "pair": ["tank"]}, "other.json")
    assert main_service([*q, "--hierarchy", str(other)]) == 2
    assert "is another" in capsys.readouterr().err
    assert main_preprocessing([*argv, "--db", str(db), "--hierarchy", str(other)]) == 2
    assert "holds 3 expert(s) built with" in capsys.readouterr().err
    assert main_evaluation(["--db", str(db), "--data_root", str(data_root), "--device", "cpu", "--n", "2"]) == 0
    assert "| 2 |" in capsys.readouterr().out.replace("  ", " ")

    # the Python API: the stored hierarchy, or a matching mapping; the shipped tasks are not this pool's
    p = Pool.open(db, "cifar100", hierarchy=OWN)
    assert list(p.cfg.tasks) == ["first", "mixed", "pair"] and p.query(["mixed"]).class_names == [
        "rocket",
        "rose",
        "whale",
    ]
    with pytest.raises(PoEError, match="is another"):
        Pool.open(db, "cifar100", hierarchy={"pair": ["tank", "tiger"]})
