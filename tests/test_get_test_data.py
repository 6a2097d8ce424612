"""scripts/get_test_data.py lays out the original release from a mirror of the original repository, checking
every file against its pinned SHA-256 (a tampered file is not written)."""

from __future__ import annotations

import importlib.util
import shutil

from .conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("get_test_data", ROOT / "scripts" / "get_test_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_release_from_a_mirror_is_checked(tmp_path, official_cifar, capsys):
    g = load_script()
    mirror = tmp_path / "mirror"
    for here, there, _ in g.RELEASE:
        (mirror / there).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(official_cifar.parent / here, mirror / there)
    out = tmp_path / "shared"
    assert g.main(["--to", str(out), "--no_cifar", "--source", mirror.as_uri()]) == 0
    for here, _, digest in g.RELEASE:
        assert g.sha256(out / "official" / here) == digest
    first = out / "official" / g.RELEASE[0][0]
    first.unlink()
    (mirror / g.RELEASE[0][1]).write_bytes(b"tampered")
    capsys.readouterr()
    assert g.main(["--to", str(out), "--no_cifar", "--source", mirror.as_uri()]) == 2
    assert "does not have the pinned SHA-256" in capsys.readouterr().err and not first.exists()
