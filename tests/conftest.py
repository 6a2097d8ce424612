"""Shared fixtures: where the real data and the original release live, and one tiny trained pool."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


MAX_WORKERS = 4  # each worker holds its own decoded data, tiny pool and models: about 2 GB at its peak


def usable_cpus() -> int:
    """As ``PoE.query.service.run.cpus``, which imports torch: the xdist controller, which asks this, never needs
    torch."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.hookimpl(optionalhook=True)  # without xdist (-p no:xdist -o addopts=-ra) the hook is unknown
def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): one test process per usable core, at most ``MAX_WORKERS``. Whole files go
    to one process (``--dist loadfile``), so a module's servers and fixtures are made once. One file, or ``-s``,
    runs in this process (0): a second process would only idle and halve the first one's threads (one file took
    19.4 s against 9.9 s), and a test process's output never shows."""
    files = {str(arg).split("::")[0] for arg in config.args}
    if (len(files) == 1 and Path(next(iter(files))).is_file()) or config.option.capture == "no":
        return 0
    return min(usable_cpus(), MAX_WORKERS)


def pytest_configure(config) -> None:
    """Each of the N test processes gets 1/N of the cores for torch's threads: two processes of two threads each
    on two cores ran slower than one (405 s against 365 s); of one thread each, faster (medians of two interleaved
    pairs: 238 s against 292 s)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, usable_cpus() // workers))


def shared_dir() -> Path:
    """``$POE_SHARED`` or ``../shared`` next to the checkout (real CIFAR-100, the original release): the folder the
    entry scripts read by default too (``PoE.core.paths``)."""
    from PoE.core.paths import shared_root

    return shared_root()


def need(path: Path) -> Path:
    """Skip when a data folder is absent, unless CI says the data must be there (then fail)."""
    if not path.exists():
        if os.environ.get("POE_REQUIRE_DATA"):
            pytest.fail(f"required test data missing: {path}")
        pytest.skip(f"test data not found: {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def decoded_cache(tmp_path_factory) -> Path:
    """Decoded image folders go to a per-session folder, never to the user's ~/.cache."""
    path = tmp_path_factory.mktemp("poe_cache")
    old = os.environ.get("POE_CACHE")
    os.environ["POE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("POE_CACHE", None)
    else:
        os.environ["POE_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def decode_shared_data_once():
    """Dozens of in-process runs read the same read-only real CIFAR-100 files; decoding the training split takes
    about 1.3 s here. Decode each file once per session and give every caller copies of its own, so that no caller
    can change the images another one reads. Files anywhere else (the corrupted copies of the tests) load as ever."""
    import PoE.core.data as data

    real, memo, shared = data.load_npz, {}, shared_dir().resolve()

    def load_npz(path, size=None, num_classes=None):
        p = Path(path).resolve()
        if shared not in p.parents:
            return real(path, size, num_classes)
        key = (p, p.stat().st_mtime_ns, size, num_classes)
        if key not in memo:
            memo[key] = real(path, size, num_classes)
        return data.ImageSet(memo[key].x.clone(), memo[key].y.clone())

    patch = pytest.MonkeyPatch()
    patch.setattr(data, "load_npz", load_npz)
    yield
    patch.undo()


@pytest.fixture(scope="session")
def data_root() -> Path:
    need(shared_dir() / "data" / "cifar100" / "test.npz")
    return shared_dir() / "data"


@pytest.fixture(scope="session")
def few_train_root(tmp_path_factory, data_root) -> Path:
    """Real CIFAR-100 with every 10th training image (5,000, about 50 a class) and the whole real test split: for
    commands whose baselines must train on real images but whose asserted numbers come from the test split."""
    import numpy as np

    root = tmp_path_factory.mktemp("few_train")
    (root / "cifar100").mkdir()
    with np.load(data_root / "cifar100" / "train.npz") as z:
        np.savez(root / "cifar100" / "train.npz", x=z["x"][::10], y=z["y"][::10])
    (root / "cifar100" / "test.npz").symlink_to(data_root / "cifar100" / "test.npz")
    return root


@pytest.fixture(scope="session")
def official_cifar() -> Path:
    return need(shared_dir() / "official" / "cifar100")


def folder_argv(folder: Path, tmp: Path, fast: list[str], *extra: str) -> list[str]:
    """Preprocessing flags for an image folder ``folder`` with its ``tasks.json``, writing under ``tmp``."""
    db, pre, tasks = str(tmp / "db"), str(tmp / "pre"), str(folder / "tasks.json")
    return [
        "--dataset",
        "folder",
        "--data_root",
        str(folder),
        "--db",
        db,
        "--pretrained",
        pre,
        "--hierarchy",
        tasks,
        *fast,
        *extra,
    ]


def run_script(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run an entry script in a fresh interpreter (to see exit codes and stderr exactly as a user does)."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


TINY = (
    "--profile quick --oracle_arch wrn-10-1 --train_limit 1024 --epochs 2 --teacher_views 2 --tasks "
    "people vehicles_1 vehicles_2 --no_progress --device cpu --precision fp32 --test_limit 1000"
).split()


@pytest.fixture(scope="module")
def pool():
    """The shipped pool on the CPU in fp32, opened once per test module (the service tests' pool)."""
    from PoE.query.pool import Pool

    return Pool.open(ROOT / "DB_PoE", "cifar100", device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def client(pool, data_root):
    """The app over the shipped pool, in process (the service tests' client)."""
    from PoE.query.service.app import create_app

    from .api import TestClient

    with TestClient(create_app(pool, data_root)) as c:
        yield c


@pytest.fixture(scope="module")
def images(pool, data_root):
    """Eight real test images of the README query's classes (uint8, N x 32 x 32 x 3)."""
    import numpy as np

    from .api import QUERY

    d = np.load(data_root / "cifar100" / "test.npz")
    return d["x"][np.flatnonzero(np.isin(d["y"], pool.make_query(QUERY).classes))[:8]]


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory, data_root) -> dict[str, Path]:
    """A pool made by a real (tiny) preprocessing run on real CIFAR-100: 1024 images, 2 epochs per stage, every part
    scored on 1,000 of the 10,000 test images. Made once per ``pytest`` run: the test processes of one run share a
    folder (the first to ask builds it under a lock, the others wait and read it), so it is read-only to tests."""
    from PoE.cli import main_preprocessing

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, shared by its workers
    db, pre = root / "tiny" / "DB_PoE", root / "tiny" / "DB_pretrained"
    with open(root / "tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "tiny" / "done").exists():
            shutil.rmtree(root / "tiny", ignore_errors=True)  # what a failed build left
            rc = main_preprocessing([*TINY, "--data_root", str(data_root), "--db", str(db), "--pretrained", str(pre)])
            assert rc == 0
            (root / "tiny" / "done").touch()
    return {"db": db, "pretrained": pre, "pool": db / "cifar100"}


def official_student(official_cifar: Path):
    """The original release's full WRN-16-1 (its library + the head trained with it), for use as a teacher."""
    from PoE.core.checkpoint import load_checkpoint
    from PoE.core.networks import WideResNet, WRNSpec

    net = WideResNet(WRNSpec(16, 1), 100)
    net.front.load_state_dict(load_checkpoint(official_cifar / "library_cifar100.pt"))
    net.back.load_state_dict(load_checkpoint(official_cifar / "library_student_classifier_cifar100.pt"))
    return net.eval()


def install_stand_in_oracle(official_cifar: Path, pretrained: Path, db: Path | None = None) -> str:
    """Write the original release's WRN-16-1 as ``pretrained/cifar100/oracle.pt`` (and, with ``db``, its
    library as a pool library distilled from it); returns the Oracle's id."""
    from PoE.core.checkpoint import save_checkpoint, state_id

    net = official_student(official_cifar)
    tid = state_id(net)
    meta = {
        "poe_format": 1,
        "dataset": "cifar100",
        "arch": "wrn-16-1",
        "epochs": 200,
        "config": "original release",
        "test_acc": 0.0,
        "test_n": 0,
        "train_seconds": 0.0,
    }
    save_checkpoint(
        pretrained / "cifar100" / "oracle.pt", {**meta, "kind": "oracle", "id": tid, "state_dict": net.state_dict()}
    )
    if db is not None:
        lib = {**meta, "oracle_id": tid, "id": state_id(net.front)}
        save_checkpoint(
            pretrained / "cifar100" / "library_student.pt",
            {**lib, "kind": "library_student", "state_dict": net.state_dict()},
        )
        save_checkpoint(
            db / "cifar100" / "library_cifar100.pt", {**lib, "kind": "library", "state_dict": net.front.state_dict()}
        )
    return tid


def fake_cifar(root: Path, n_train: int, n_test: int) -> Path:
    """A generated CIFAR-100-shaped data folder (random pixels, labels cycling through the 100 classes): for
    runs whose speed or plumbing, not accuracy, is under test. Returns the data root."""
    import numpy as np

    rng = np.random.default_rng(0)
    folder = root / "cifar100"
    folder.mkdir(parents=True)
    for split, n in (("train", n_train), ("test", n_test)):
        np.savez(folder / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 100)
    return root


def rewrite_part(path: Path, change) -> None:
    """Rewrite a pool part with ``change(checkpoint)`` applied, as a careful forger would: the file's digest is
    recomputed and the pool's manifest lists the new one, so only the checks beneath the manifest can object."""
    import json

    from PoE.core.checkpoint import file_record, load_checkpoint, part_digest, save_checkpoint, seal

    obj = load_checkpoint(path)
    change(obj)
    payload = seal(obj)
    save_checkpoint(path, payload)
    root = path.parent.parent if path.parent.name == "experts" else path.parent
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["parts"][path.relative_to(root).as_posix()] = part_digest(payload)
    if "files" in manifest:  # format 4: the file's size and SHA-256 too
        manifest["files"][path.relative_to(root).as_posix()] = file_record(path)
    (root / "manifest.json").write_text(json.dumps(manifest))


def relist(path: Path) -> None:
    """Record ``path``'s present size and SHA-256 in its pool's manifest (format 4), as a forger would: the file then
    passes the check before reading, and what is tested is how its content is refused once read."""
    import json

    from PoE.core.checkpoint import file_record

    root = path.parent.parent if path.parent.name == "experts" else path.parent
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][path.relative_to(root).as_posix()] = file_record(path)
    (root / "manifest.json").write_text(json.dumps(manifest))


def consolidated(library, experts, query):
    """The consolidated network of separate experts (the pool builds it from its cached bank instead)."""
    from PoE.core.consolidate import ConsolidatedNet
    from PoE.core.networks import bank_of

    return ConsolidatedNet(library, bank_of(experts), query)


def check_disjoint(table) -> None:
    """Raise if any class belongs to two tasks (consolidation places each class once)."""
    seen: dict[int, str] = {}
    for name, cls in table.items():
        for c in cls:
            if c in seen:
                raise ValueError(f"class {c} is in both {seen[c]!r} and {name!r}")
            seen[c] = name


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory) -> Path:
    """Four Tiny-ImageNet classes' validation images, upscaled to 96 pixels: 20 each in train/, 10 in val/."""
    import json

    from . import large  # it reads this module's ROOT

    val = need(shared_dir() / "data" / "tiny-imagenet-200" / "val")
    root = tmp_path_factory.mktemp("large")
    large.maker().write_folder(val, root, large.WNIDS, large.SIZE, 20)
    for d in (root / "val").iterdir():  # 30 left for val/: keep 10
        for f in sorted(d.iterdir())[10:]:
            f.unlink()
    (root / "tasks.json").write_text(json.dumps(large.TASKS))
    return root


@pytest.fixture(scope="module")
def oracle_file(tmp_path_factory, large_folder) -> Path:
    """The stand-in Oracle exported as ONNX for 96-pixel input (dynamic batch)."""
    from . import large

    official = need(shared_dir() / "official" / "tinyimagenet")
    out = tmp_path_factory.mktemp("oracle") / "tiny4.onnx"
    large.maker().export_oracle(official, [d.name for d in (large_folder / "train").iterdir()], large.SIZE, out)
    return out
