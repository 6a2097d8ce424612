"""Lay out the data the entry scripts, the examples and the tests read, for a machine that has none of it:

    <to>/data/cifar100/{train,test}.npz     CIFAR-100 (torchvision's download, converted: x uint8 N x 32 x 32 x 3, y)
    <to>/official/cifar100/...              the original code's released CIFAR-100 pool
    <to>/official/tinyimagenet/...          and its Tiny-ImageNet pool
    <to>/data/tiny-imagenet-200/            Tiny-ImageNet's wnids.txt and val/ (with --tiny; a 237 MB download)

The released pools come from the original authors' public repository, PoE-code/Pool-of-Experts-code, at a
pinned commit, and every file is checked against its SHA-256 before it is written. Files already in place
(with the right hash) are kept; a failed download leaves no file and no empty folder behind. The entry
scripts (``--data_root``'s default) and the tests read ``../shared`` beside the checkout, or where $POE_SHARED
points (``PoE/core/paths.py``):

    python scripts/get_test_data.py                 # writes ../shared
    export POE_SHARED=~/poe-data && python scripts/get_test_data.py --tiny   # writes ~/poe-data
    python scripts/get_test_data.py --manual        # without network: which files to put where, by hand
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import shutil
import sys
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from PoE.core.paths import SHARED_ENV, shared_root

REPO = "https://raw.githubusercontent.com/PoE-code/Pool-of-Experts-code/dd309cf0b72f45b45d65f9e1014b94257292f31f"
REPO_PAGE = "https://github.com/PoE-code/Pool-of-Experts-code/tree/dd309cf0b72f45b45d65f9e1014b94257292f31f"
TINY_ZIP = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CIFAR_TAR = "cifar-100-python.tar.gz"  # torchvision's download, used as it is when placed in <to>/data/cifar100/
# (file here, path in the original repository, sha256)
RELEASE = [
    (
        "cifar100/library_cifar100.pt",
        "CIFAR100/PoE/DB_Pool of Experts/Library/library_cifar100.pt",
        "b45ae238ab766e92db4e762b87f6a9199323cdce79890632caeabc53c4c0e9a9",
    ),
    (
        "cifar100/library_student_classifier_cifar100.pt",
        "CIFAR100/PoE/DB_pretrained/student for library/classifier_cifar100.pt",
        "e27460e1f21f8482accd7918015906509ab7baac3550f20d790226bdc1db4bf9",
    ),
    *[
        (f"cifar100/experts/expert_{t}.pt", f"CIFAR100/PoE/DB_Pool of Experts/Experts/expert_{t}.pt", h)
        for t, h in [
            ("large_omnivores_and_herbivores", "bb4c141b83c49b4877391482c5d1ec7483f0467b0fcf000e192de7d944a069e8"),
            ("medium-sized_mammals", "64e6a039c7db0f277ced8112bffb87667d37995cb38f64ad703fea7bb874ba91"),
            ("people", "a6453390f3712fab90ada08eae676f3d5556f6029ee82acbbb844d0c0c06b566"),
            ("small_mammals", "dea7c69b5c60ffc25e3aab6d4eeb2727060a5c6b4a9414c0dc7925b915ac1d01"),
            ("vehicles_1", "d96f07883590c4774847e769932da557b8a551f1af75a5af0bcd8718450145bc"),
            ("vehicles_2", "8b26d3e04d0e5620091ffbb3a79051e024a1769beb9e8dd25513474182404457"),
        ]
    ],
    (
        "tinyimagenet/library_TinyImageNet.pt",
        "TinyImageNet/PoE/DB_Pool of Experts/Library/library_TinyImageNet.pt",
        "fd1cd8a2b4f01c448e0dda7cc2ebfcfa0fd4ca3a97676eb06146004504769f34",
    ),
    (
        "tinyimagenet/library_student_classifier_TinyImageNet.pt",
        "TinyImageNet/PoE/DB_pretrained/student for library/classifier_TinyImageNet.pt",
        "11c74e44d06139312f3d94f7f28d595bf58f86d9a7552f5a84261f1f7e68bc87",
    ),
    *[
        (f"tinyimagenet/experts/expert_{t}.pt", f"TinyImageNet/PoE/DB_Pool of Experts/Experts/expert_{t}.pt", h)
        for t, h in [
            ("arachnid", "048b2eea4c241820862131ec115da22d1dc9024d93630da86bde6620387a6925"),
            ("bird", "002ba546c7134708dcc3d8389984d03689a59ffb75f6fe3550510a7f28981bde"),
            ("canine", "9c363fdf80150ff2ae8a0e8e274b0001d57e89468ee9c0cc565309d850f53727"),
            ("feline", "d147ea763539e136caa679bc54812bd8cc733477d1d7605e21c40efaf36fdba1"),
            ("ungulate", "bc842e259e628c509ecef834710850ed036183fe5471ffe984a14400514a0159"),
            ("vertebrate_etc", "1aecdc7434cd4e0781c13b321bbd9cdc4b267a17dec28bb3e43f7653dde41adf"),
        ]
    ],
]


class Failed(Exception):
    """One line for the user: what failed and what to do."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def made_dirs(folder: Path) -> Iterator[Path]:
    """Create ``folder`` (and its parents); if the block fails, remove the ones created here that are still
    empty, so that a failed run (no network) leaves no empty folder that looks like data."""
    created = [d for d in (folder, *folder.parents) if not d.exists()]  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        for d in created:
            with contextlib.suppress(OSError):  # not empty (files of an earlier success): keep it and its parents
                d.rmdir()
        raise


def download(url: str, target: Path) -> None:
    """``url`` to ``target`` through a temporary file beside it (never a half-written ``target``)."""
    with made_dirs(target.parent):
        tmp = target.with_name(f".{target.name}.part")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
            tmp.replace(target)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise Failed(f"cannot download {url} ({getattr(e, 'reason', None) or e})") from None


def manual(to: Path) -> str:
    """How to lay the files out by hand, for a machine without network."""
    release = "\n".join(
        f"  {to / 'official' / here}\n      <- {there}\n      sha256 {digest}" for here, there, digest in RELEASE
    )
    return f"""Without network, copy the files in by hand; this script then checks them and keeps them.

The original release, from the original repository at the pinned commit ({REPO_PAGE}):
either clone or unpack that repository anywhere and run
  python scripts/get_test_data.py --source file:///path/to/Pool-of-Experts-code
or put each file at its place below; each must have the SHA-256 shown (a file that does not is downloaded again):
{release}

CIFAR-100: put torchvision's archive {CIFAR_TAR} (https://www.cs.toronto.edu/~kriz/{CIFAR_TAR}, MD5
eb9058c3a382ffc7106e4002c42a8d85, which torchvision checks) into {to / "data" / "cifar100"}/ and rerun: it
becomes train.npz and test.npz there (uint8 x N x 32 x 32 x 3, int64 y); or write those two files yourself.

Tiny-ImageNet (--tiny): a local copy of tiny-imagenet-200.zip: --tiny --tiny_url file:///path/to/tiny-imagenet-200.zip,
or unzip it so that {to / "data" / "tiny-imagenet-200"}/wnids.txt and val/ exist.
"""


def get_release(to: Path, source: str) -> None:
    for here, there, digest in RELEASE:
        target = to / "official" / here
        if target.is_file() and sha256(target) == digest:
            continue
        download(f"{source}/{urllib.parse.quote(there)}", target)
        if sha256(target) != digest:
            target.unlink()
            raise Failed(f"{there} from {source} does not have the pinned SHA-256 {digest[:16]}...; not written")
        print(f"  {target}")


def get_cifar100(to: Path) -> None:
    import torchvision

    folder = to / "data" / "cifar100"
    if all((folder / f"{s}.npz").is_file() for s in ("train", "test")):
        return
    with made_dirs(folder), tempfile.TemporaryDirectory(dir=folder) as tmp:
        if (folder / CIFAR_TAR).is_file():  # supplied by hand: torchvision checks its MD5 and downloads nothing
            shutil.copy(folder / CIFAR_TAR, tmp)
        for split in ("train", "test"):
            try:
                ds = torchvision.datasets.CIFAR100(tmp, train=split == "train", download=True)
            except Exception as e:  # torchvision raises many kinds; all mean the same to the user
                raise Failed(f"CIFAR-100 download through torchvision failed ({e})") from None
            part = folder / f".{split}.npz.part"
            with open(part, "wb") as f:
                np.savez(f, x=np.asarray(ds.data, dtype=np.uint8), y=np.asarray(ds.targets, dtype=np.int64))
            part.replace(folder / f"{split}.npz")
            print(f"  {folder / f'{split}.npz'} ({len(ds)} images)")


def get_tiny(to: Path, url: str) -> None:
    folder = to / "data" / "tiny-imagenet-200"
    if (folder / "val" / "val_annotations.txt").is_file() and (folder / "wnids.txt").is_file():
        return
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "tiny.zip"
        download(url, archive)
        try:
            with zipfile.ZipFile(archive) as z:
                members = [
                    m for m in z.namelist() if m.startswith(("tiny-imagenet-200/val/", "tiny-imagenet-200/wnids"))
                ]
                z.extractall(Path(tmp) / "x", members)
        except zipfile.BadZipFile:
            raise Failed(f"{url} is not a zip archive") from None
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(Path(tmp) / "x" / "tiny-imagenet-200"), str(folder))
    print(f"  {folder} (wnids.txt, val/)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--to",
        default=str(shared_root()),
        help=f"where to lay it out (default: ${SHARED_ENV}, else "
        "../shared beside the checkout: %(default)s; the entry scripts and the tests read it there)",
    )
    p.add_argument("--tiny", action="store_true", help="also Tiny-ImageNet's validation split (237 MB download)")
    p.add_argument("--no_cifar", action="store_true", help="only the released pools (and --tiny)")
    p.add_argument("--source", default=REPO, help="base URL of the original repository's files (a mirror)")
    p.add_argument("--tiny_url", default=TINY_ZIP, help="Tiny-ImageNet's zip (a file:// URL for a local copy)")
    p.add_argument("--manual", action="store_true", help="say which files to put where by hand (no network), and stop")
    a = p.parse_args(argv)
    to = Path(a.to)
    if a.manual:
        print(manual(to))
        return 0
    try:
        print(f"original release -> {to / 'official'}")
        get_release(to, a.source)
        if not a.no_cifar:
            print(f"CIFAR-100 -> {to / 'data' / 'cifar100'}")
            get_cifar100(to)
        if a.tiny:
            print(f"Tiny-ImageNet validation split -> {to / 'data' / 'tiny-imagenet-200'}")
            get_tiny(to, a.tiny_url)
    except Failed as e:
        print(
            f"error: {e}; without network, `python scripts/get_test_data.py --manual` says which files to put where",
            file=sys.stderr,
        )
        return 2
    where = "" if to.resolve() == shared_root().resolve() else f" once you set {SHARED_ENV}={to}"
    print(f"done; the entry scripts and the tests read {to}{where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
