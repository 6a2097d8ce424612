"""Input made to break the commands: JSON files nested past Python's recursion limit or that never end, image
folders with FIFOs, symbolic link loops and images that decode into gigabytes, a dataset.json out of range,
pools of more than 256 tasks, and combination counts, seeds and networks out of all proportion. Each is one
line (or a named skip) and no traceback, no hang. (A killed supervisor: tests/test_scale_out.py.)"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from PoE.cli import main_evaluation, main_experiments, main_preprocessing, main_service
from PoE.cli.experiments import experiments_parser
from PoE.core.datasets import get_dataset
from PoE.core.datasets.cifar100 import CLASSES as CIFAR_NAMES
from PoE.core.errors import PoEError
from PoE.query.pool import Pool
from PoE.query.service import create_app

from .api import TestClient
from .conftest import ROOT

SHIPPED = ROOT / "DB_PoE"
DEEP = "[" * 1500 + "]" * 1500  # past Python's recursion limit (1000): json.loads raised RecursionError
ALL_TASKS = list(get_dataset("cifar100").tasks)
FAST = "--profile quick --epochs 1 --teacher_views 1 --no_progress --device cpu --precision fp32 --stages oracle"


def one_line(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture
def shipped_copy(tmp_path) -> Path:
    shutil.copytree(SHIPPED, tmp_path / "db")
    return tmp_path / "db"


def test_json_nested_past_the_recursion_limit_is_one_line_wherever_it_is_read(tmp_path, shipped_copy, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text('{"a": ' + DEEP + "}")
    rc = main_preprocessing(["--db", str(shipped_copy), "--add_tasks", str(deep), "--device", "cpu"])
    assert "nested deeper than 64 levels" in one_line(capsys, rc)
    rc = main_evaluation(["--db", str(SHIPPED), "--hierarchy", str(deep), "--device", "cpu"])
    assert f"error: hierarchy {deep}: nested deeper than 64 levels" in one_line(capsys, rc)

    # the pool's readable hierarchy.json: the manifest's hierarchy is used, with a note saying how to rewrite it
    shutil.copy(deep, shipped_copy / "cifar100" / "hierarchy.json")
    assert main_service(["--db", str(shipped_copy), "--list"]) == 0
    out = capsys.readouterr()
    assert "hierarchy.json: nested deeper than 64 levels" in out.out and "Traceback" not in out.out + out.err

    manifest = shipped_copy / "cifar100" / "manifest.json"
    manifest.write_text('{"parts": ' + DEEP + "}")
    line = one_line(capsys, main_service(["--db", str(shipped_copy), "--list"]))
    assert f"{manifest}: nested deeper than 64 levels" in line

    folder_pool = tmp_path / "fdb" / "folder"
    folder_pool.mkdir(parents=True)
    shutil.copy(SHIPPED / "cifar100" / "library_cifar100.pt", folder_pool / "library_folder.pt")
    (folder_pool / "dataset.json").write_text('{"class_names": ' + DEEP + ', "image_size": 32}')
    line = one_line(capsys, main_service(["--dataset", "folder", "--db", str(folder_pool.parent), "--list"]))
    assert "dataset.json: nested deeper than 64 levels" in line


def test_the_json_reader_counts_brackets_outside_strings_only(tmp_path):
    from PoE.core.jsonfile import MAX_JSON_DEPTH, read_json

    path = tmp_path / "x.json"
    deepest = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    path.write_text(json.dumps({"a": "[[[[" * 100, "b": '"]]' * 100}) + "\n")
    assert read_json(path)["a"].startswith("[[[[")
    path.write_text(deepest)
    assert read_json(path) == json.loads(deepest)
    path.write_text("[" + deepest + "]")
    with pytest.raises(PoEError, match="nested deeper than 64 levels"):
        read_json(path)
    path.write_text('["' + "a" * 10**6)  # an unclosed string: matched without backtracking (2^n tries)
    with pytest.raises(PoEError, match="not JSON"):
        read_json(path)


def returns_within(call, fifo: Path, seconds: float = 30):
    """``call()``'s result; a call still waiting on the FIFO after ``seconds`` is released (a writer opens it) and
    the test fails: before, opening a FIFO waited for a writer forever."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(result=call()), daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        with open(fifo, "wb"):
            pass
        worker.join(30)
        pytest.fail(f"still waiting on the FIFO {fifo} after {seconds} s")
    return box.get("result")


def test_json_files_that_never_end_are_refused_before_reading(tmp_path, shipped_copy, capsys):
    fifo = tmp_path / "tasks.json"
    os.mkfifo(fifo)
    argv = ["--db", str(shipped_copy), "--device", "cpu", "--add_tasks"]
    rc = returns_within(lambda: main_preprocessing([*argv, str(fifo)]), fifo)
    assert f"hierarchy {fifo}: a FIFO, not a regular file; expected a JSON file" in one_line(capsys, rc)
    sparse = tmp_path / "huge.json"
    with open(sparse, "wb") as f:
        f.truncate(40 * 2**20)
    assert "41,943,040 bytes, over the limit of 33,554,432" in one_line(
        capsys, main_preprocessing([*argv, str(sparse)])
    )

    # /dev/zero was read until memory ran out: here in a process limited to 4 GB of data, so that it cannot take more
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (4 * 2**30, 4 * 2**30))

    cmd = [sys.executable, "Run_preprocessing.py", *argv, "/dev/zero"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert done.returncode == 2 and done.stderr == (
        "error: hierarchy /dev/zero: a character device, not a regular file; expected a JSON file "
        '{"task name": ["class name", ...], ...}\n'
    ), done.stderr


@pytest.fixture(scope="module")
def two_class_folder(tmp_path_factory, data_root) -> Path:
    """Two CIFAR-100 classes' test images as PNGs: 10 per class in train/, 4 in test/."""
    from PIL import Image

    root = tmp_path_factory.mktemp("two_classes")
    with np.load(data_root / "cifar100" / "test.npz") as z:
        x, y = z["x"], z["y"]
    for c in (0, 8):
        idx = np.flatnonzero(y == c)
        for split, part in (("train", idx[:10]), ("test", idx[10:14])):
            (root / split / CIFAR_NAMES[c]).mkdir(parents=True)
            for i in part:
                Image.fromarray(x[i]).save(root / split / CIFAR_NAMES[c] / f"{i}.png")
    (root / "tasks.json").write_text(json.dumps({"a": ["apple"], "b": ["bicycle"]}))
    return root


def folder_argv(folder: Path, tmp: Path) -> list[str]:
    paths = [
        "--data_root",
        folder,
        "--db",
        tmp / "db",
        "--pretrained",
        tmp / "pre",
        "--hierarchy",
        folder / "tasks.json",
    ]
    return ["--dataset", "folder", *map(str, paths), *FAST.split()]


def test_fifos_and_broken_links_in_an_image_folder_are_skipped_and_named(two_class_folder, tmp_path):
    """A FIFO named x.png (decoding waited for a writer forever), a dangling link and a link loop among the
    images (tracebacks), a link loop beside the class folders: the run goes on over the real images and names
    each skipped entry in one line. In a subprocess, so that a hang ends at its timeout."""
    folder = tmp_path / "images"
    shutil.copytree(two_class_folder, folder)
    apple = folder / "train" / "apple"
    os.mkfifo(apple / "x.png")
    (apple / "gone.png").symlink_to("nowhere.png")
    (apple / "loop.png").symlink_to("loop.png")
    (folder / "train" / "circle").symlink_to("circle")
    cmd = [sys.executable, "Run_preprocessing.py", *folder_argv(folder, tmp_path)]
    env = {**os.environ, "POE_CACHE": str(tmp_path / "cache")}
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the run hung on the image folder")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("skipped")]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("skipped 4 entries that cannot be read as an image or a folder: ")
    named = [
        f"{folder / 'train' / 'circle'} (a symbolic link loop)",
        f"{apple / 'gone.png'} (a dangling symbolic link)",
        f"{apple / 'loop.png'} (a symbolic link loop)",
        f"{apple / 'x.png'} (a FIFO)",
    ]
    assert all(part in lines[0] for part in named), lines[0]
    assert "Oracle (wrn-16-1)  all classes" in done.stdout


@pytest.mark.parametrize("shape", [(3_000_000, 1), (1, 100_000)])
def test_images_that_decode_into_gigabytes_are_refused_from_their_header(two_class_folder, tmp_path, capsys, shape):
    """A 3,000,000 x 1 PNG ended in a MemoryError; a 1 x 1,000,000 one took 6.1 GB (resized to 32 pixels on its
    shorter side: 32 x 32,000,000); 1 x 100,000 here, 0.6 GB before. Refused from the header, or skipped."""
    from PIL import Image

    folder = tmp_path / "images"
    shutil.copytree(two_class_folder, folder)
    Image.new("L", shape).save(folder / "train" / "apple" / "long.png")
    argv = folder_argv(folder, tmp_path)
    line = one_line(capsys, main_preprocessing(argv))
    assert f"cannot read image {folder / 'train' / 'apple' / 'long.png'} (ImageTooLarge: {shape[0]}x{shape[1]} " in line
    assert "more than the 50,000,000 read per image once its shorter side is resized to 32" in line
    assert main_preprocessing([*argv, "--skip_bad_images"]) == 0
    assert "skipped unreadable image" in capsys.readouterr().err


def test_pils_decompression_bomb_limit_is_an_image_error_not_a_warning(tmp_path, monkeypatch):
    from PIL import Image

    from PoE.core.data import ImageTooLarge, opened_image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,600 pixels: PIL's warning (over 1x, under 2x)
    with pytest.raises(ImageTooLarge, match="over PIL's limit of 1,000 pixels"):
        with opened_image(tmp_path / "a.png"):
            pass
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL's error (over 2x)
    with pytest.raises(ImageTooLarge, match="over PIL's limit of 500 pixels"):
        with opened_image(tmp_path / "a.png"):
            pass
    monkeypatch.undo()
    with opened_image(tmp_path / "a.png", side=32) as im:
        assert im.size == (40, 40)


@pytest.mark.parametrize(
    ("desc", "message"),
    [
        (
            {"class_names": ["apple", "bicycle"], "image_size": -5},
            "image_size must be an integer from 8 to 1024, got -5",
        ),
        ({"class_names": ["apple", "bicycle"], "image_size": 10**9}, "image_size must be an integer from 8 to 1024"),
        ({"class_names": ["apple", "bicycle"], "image_size": "32"}, "image_size must be an integer from 8 to 1024"),
        ({"class_names": ["apple", "apple"], "image_size": 32}, "class_names must be a list of 2 or more different"),
        ({"class_names": "apple", "image_size": 32}, "class_names must be a list of 2 or more different"),
        (["apple"], "class_names must be a list of 2 or more different"),
    ],
)
def test_dataset_json_out_of_range_is_one_line(tmp_path, capsys, desc, message):
    pool = tmp_path / "db" / "folder"
    pool.mkdir(parents=True)
    shutil.copy(SHIPPED / "cifar100" / "library_cifar100.pt", pool / "library_folder.pt")
    (pool / "dataset.json").write_text(json.dumps(desc))
    line = one_line(capsys, main_service(["--dataset", "folder", "--db", str(tmp_path / "db"), "--list"]))
    assert line.startswith(f"error: {pool / 'dataset.json'}: {message}"), line


def many_tasks(n: int) -> Pool:
    """The shipped pool with ``n`` tasks: task tNNN is the shipped expert of task NNN mod 20 (same classes), so
    that the service sees a pool of ``n`` tasks and experts without training them."""
    pool = Pool.open(SHIPPED, "cifar100", device="cpu", precision="fp32")
    real = list(pool.cfg.tasks)
    names = {f"t{i:03d}": real[i % len(real)] for i in range(n)}
    pool.cfg = dataclasses.replace(pool.cfg, tasks={t: pool.cfg.tasks[r] for t, r in names.items()})
    for store in (pool.experts, pool.expert_meta, pool.states):
        store.update({t: store[r] for t, r in names.items()})
    return pool


def test_a_pool_of_more_than_256_tasks_serves_the_model_urls_it_gives(data_root):
    """Task 256 on was written with three hex digits in a model id read two at a time: /api/query gave a URL
    that answered 404."""
    from PoE.query.service.core import View, index_digits

    assert [index_digits(n) for n in (1, 20, 256, 257, 4096, 4097)] == [2, 2, 2, 3, 3, 4]
    pool = many_tasks(257)
    view = View(pool)
    for tasks in (["t256"], ["t255", "t001"], ["t000", "t256", "t017"]):
        assert view.tasks_of(view.model_id(tasks)) == tasks
    with TestClient(create_app(pool)) as client:
        url = client.post("/api/query", json={"tasks": ["t256", "t001"]}).json()["model"]
        assert url.endswith("-100001.pt2"), url
        r = client.get(url)
        assert r.status_code == 200 and 'filename="poe_t256__t001.pt2"' in r.headers["content-disposition"]
        assert client.get(url.replace("-100001", "-1000")).status_code == 404


def test_combinations_beyond_the_bound_are_refused_before_any_work(capsys, monkeypatch):
    """All 20 tasks at n = 10 are 184,756 combinations (about six hours here, with no estimate); --combos_per_n 0
    trains 392 baseline models. Both are refused in one line saying how to ask for fewer."""
    import PoE.experiments

    def never(*args, **kwargs):
        raise AssertionError("scoring started")

    monkeypatch.setattr(PoE.experiments, "pool_combinations", never)
    monkeypatch.setattr(PoE.experiments, "compare", never)
    rc = main_evaluation(["--db", str(SHIPPED), "--tasks", *ALL_TASKS, "--n", "10", "--device", "cpu"])
    line = one_line(capsys, rc)
    assert "20 tasks make 184,756 combinations (184,756 at n = 10), over the limit of 5,000" in line
    assert "raise --max_combinations" in line
    rc = main_experiments(["--db", str(SHIPPED), "--combos_per_n", "0", "--device", "cpu", "--out", "/nonexistent"])
    line = one_line(capsys, rc)
    assert "the baselines would train 392 models (7 method(s) x 56 combination(s) at --combos_per_n 0 (all))" in line
    assert "give --combos_per_n 3 or less, fewer --methods or --n, or raise --max_trainings" in line


def test_absurd_seeds_and_networks_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiments_parser().parse_args(["--seed", str(2**70)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "--seed: must be an integer >= 0 and <= 4294967295, got 1180591620717411303424" in err
    )
    rc = main_preprocessing(
        ["--oracle_arch", "wrn-16-1000", "--db", str(tmp_path / "db"), "--pretrained", str(tmp_path / "pre")]
    )
    assert "wrn-16-1000 would hold about 193,536M parameters, over the limit of 200M" in one_line(capsys, rc)
    assert not (tmp_path / "db").exists() and not (tmp_path / "pre").exists()
