"""The service: reproduction of the original release, export, listing, and every bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from PoE.cli import main_service
from PoE.core.datasets import get_dataset
from PoE.query.pool import Pool

from .conftest import run_script

QUERY = ["people", "vehicles_1", "vehicles_2"]


def service_json(capsys, *argv: str) -> dict:
    assert main_service([*argv, "--json", "--device", "cpu"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def service_error(capsys, *argv: str) -> str:
    """Run the service expecting a user error: exit code 2 and exactly one line on stderr."""
    rc = main_service([*argv, "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_reproduces_the_original_code_on_its_released_pool(capsys, official_cifar, data_root):
    r = service_json(capsys, "--db", str(official_cifar), "--data_root", str(data_root), "--queriedTask", *QUERY)
    assert r["tasks"] == QUERY
    assert r["accuracy"] == pytest.approx(76.13, abs=0.005)
    assert r["n_test"] == 1500
    assert r["params"] == 79695
    assert 0.019e9 < r["flops"] < 0.022e9  # about 0.02B multiply-adds, as the paper counts
    assert r["build_ms"] > 0 and set(r) >= {"tasks", "accuracy", "n_test", "flops", "params", "build_ms"}


def test_two_task_query_on_released_pool(capsys, official_cifar, data_root):
    r = service_json(
        capsys, "--db", str(official_cifar), "--data_root", str(data_root), "--queriedTask", "people", "small_mammals"
    )
    assert r["n_test"] == 1000
    assert 60.0 < r["accuracy"] < 100.0


def test_list_shows_tasks_and_presence(capsys, official_cifar):
    assert main_service(["--db", str(official_cifar), "--list"]) == 0
    out = capsys.readouterr().out
    assert "6 of 20 experts present" in out
    assert "people" in out and "[2 baby, 11 boy, 35 girl, 46 man, 98 woman]" in out


def test_export_round_trip(tmp_path, capsys, official_cifar):
    path = tmp_path / "model.pt2"
    assert (
        main_service(
            [
                "--db",
                str(official_cifar),
                "--queriedTask",
                *QUERY,
                "--export",
                str(path),
                "--no_eval",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cfg = get_dataset("cifar100")
    model = Pool.open(official_cifar).query(QUERY).module
    loaded = torch.export.load(str(path)).module()
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    for batch in (1, 3, 17):
        x = torch.rand(batch, 3, 32, 32)
        got = loaded(x)
        want = model((x - mean) / std)
        assert got.shape == (batch, 15)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert torch.equal(got.argmax(1), want.argmax(1))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


# ------------------------------------------------------------------ bad input
def test_unknown_task(capsys, official_cifar):
    line = service_error(capsys, "--db", str(official_cifar), "--queriedTask", "people", "dragons")
    assert "unknown task 'dragons'" in line
    assert "vehicles_2" in line and "aquatic_mammals" in line


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--queriedTask"], "empty query"),
        ([], "name the query with --queriedTask"),
        (["--queriedTask", "people", "people"], "'people' is named twice"),
        (["--dataset", "mnist", "--queriedTask", "people"], "invalid choice: 'mnist'"),
    ],
)
def test_bad_queries(capsys, official_cifar, argv, message):
    assert message in service_error(capsys, "--db", str(official_cifar), *argv)


def test_missing_pool_names_file_and_command(capsys, tmp_path):
    line = service_error(capsys, "--db", str(tmp_path / "empty"), "--queriedTask", "people")
    assert "library_cifar100.pt" in line and "Run_preprocessing.py" in line


@pytest.fixture
def pool_copy(tmp_path, official_cifar):
    dst = tmp_path / "pool"
    shutil.copytree(official_cifar, dst)
    return dst


def test_missing_expert_names_file_and_command(capsys, pool_copy):
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "trees")
    assert "expert_trees.pt" in line and "--stages experts --tasks trees" in line


def test_corrupt_expert_names_file(capsys, pool_copy):
    (pool_copy / "experts" / "expert_people.pt").write_bytes(b"\x00garbage")
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people", "vehicles_1")
    assert "expert_people.pt is not a readable PyTorch checkpoint" in line


def test_mismatched_expert_names_file(capsys, pool_copy):
    shutil.copy(pool_copy / "library_cifar100.pt", pool_copy / "experts" / "expert_people.pt")
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people")
    assert "expert_people.pt does not hold an expert" in line


def test_expert_of_wrong_size_names_file(capsys, pool_copy):
    sd = torch.load(pool_copy / "experts" / "expert_people.pt", map_location="cpu", weights_only=True)
    sd["fc.weight"], sd["fc.bias"] = sd["fc.weight"][:3], sd["fc.bias"][:3]
    torch.save(sd, pool_copy / "experts" / "expert_people.pt")
    line = service_error(capsys, "--db", str(pool_copy), "--queriedTask", "people")
    assert "expert_people.pt does not fit: it has 3 outputs" in line


def test_unwritable_export_paths_leave_nothing(capsys, tmp_path, official_cifar):
    line = service_error(
        capsys,
        "--db",
        str(official_cifar),
        "--queriedTask",
        "people",
        "--no_eval",
        "--export",
        str(tmp_path / "no" / "such" / "dir" / "m.pt2"),
    )
    assert "does not exist" in line
    line = service_error(
        capsys, "--db", str(official_cifar), "--queriedTask", "people", "--no_eval", "--export", str(tmp_path)
    )
    assert "is a folder" in line
    assert list(tmp_path.iterdir()) == []


def test_cuda_request_without_cuda(capsys, official_cifar):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc = main_service(["--db", str(official_cifar), "--queriedTask", "people", "--device", "cuda"])
    assert rc == 2 and "CUDA is not available" in capsys.readouterr().err


def test_script_exit_code_and_single_line_without_traceback(official_cifar):
    r = run_script("Run_Service.py", "--db", str(official_cifar), "--queriedTask", "unicorns")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "unknown task 'unicorns'" in r.stderr


def test_shipped_pool_answers_the_readme_query(capsys, data_root):
    from .conftest import ROOT

    r = service_json(capsys, "--db", str(ROOT / "DB_PoE"), "--data_root", str(data_root), "--queriedTask", *QUERY)
    assert r["n_test"] == 1500 and r["params"] == 79695
    assert r["accuracy"] > 40.0  # chance on 15 classes is 6.7%
