"""scripts/get_test_data.py lays out the original release from a mirror of the original repository, checking
every file against its pinned SHA-256 (a tampered file is not written)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

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


def test_no_network_leaves_no_empty_folder_and_says_how_to_supply_the_files(tmp_path, capsys, monkeypatch):
    g = load_script()
    out = tmp_path / "shared"
    unreachable = (tmp_path / "no-such-mirror").as_uri()  # fails at once, as a machine without network does
    assert g.main(["--to", str(out), "--no_cifar", "--source", unreachable]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot download") and "--manual" in err and err.count("\n") == 1
    assert not out.exists()  # not even an empty official/cifar100/

    import torchvision

    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-100-python.tar.gz")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(g.Failed):
        g.get_cifar100(out)
    assert not out.exists()

    assert g.main(["--to", str(out), "--manual"]) == 0
    text = capsys.readouterr().out
    for here, there, digest in g.RELEASE:  # every file: where it goes, where it comes from, its SHA-256
        assert f"{out / 'official' / here}\n      <- {there}\n      sha256 {digest}" in text
    assert "cifar-100-python.tar.gz" in text and str(out / "data" / "cifar100") in text


def test_one_data_folder_for_the_entry_scripts_the_tests_and_this_script(tmp_path, monkeypatch, capsys):
    """--data_root's default is where this script lays the data out and where the tests read it; POE_SHARED moves
    all three together."""
    from PoE.cli.baselines import baselines_parser
    from PoE.cli.evaluation import evaluation_parser
    from PoE.cli.experiments import experiments_parser
    from PoE.cli.preprocessing import preprocessing_parser
    from PoE.cli.service import service_parser

    from .conftest import shared_dir

    parsers = (service_parser, preprocessing_parser, evaluation_parser, baselines_parser, experiments_parser)
    for env in (None, tmp_path / "elsewhere"):
        if env is None:
            monkeypatch.delenv("POE_SHARED", raising=False)
        else:
            monkeypatch.setenv("POE_SHARED", str(env))
        shared = shared_dir()
        assert shared == (env or ROOT.parent / "shared")
        assert {Path(p().get_default("data_root")) for p in parsers} == {shared / "data"}
        assert load_script().main(["--manual"]) == 0
        assert str(shared / "data" / "cifar100") in capsys.readouterr().out  # the script's default --to
