"""Every baseline runs end to end on a few batches of real data and yields the stated target network."""

from __future__ import annotations

import pytest
import torch

from PoE import SHIPPED_POOL
from PoE.build.baselines import METHODS, BaselineConfig, BaselineRunner, Sources
from PoE.build.losses import padded_kd, restricted_kd
from PoE.build.profiles import StageConfig
from PoE.core.datasets import get_dataset, load_split
from PoE.core.errors import PoEError
from PoE.query.pool import Pool

from .conftest import official_student

TASKS = ["people", "vehicles_1"]


@pytest.fixture(scope="module")
def runner(official_cifar, data_root, tmp_path_factory):
    cfg = get_dataset("cifar100")
    train = load_split("cifar100", data_root, "train")
    classes = sorted(c for t in TASKS for c in cfg.tasks[t])
    keep = torch.isin(train.y, torch.tensor(classes)).nonzero().flatten()
    train = train.subset(keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))[:256]])
    test = load_split("cifar100", data_root, "test")
    pool = Pool.open(official_cifar)

    def oracle():  # stand-in Oracle: the original release's WRN-16-1 (library + its head)
        return official_student(official_cifar)

    def pool_part(task):
        return pool.library if task is None else pool.experts[task]

    stage = StageConfig(epochs=1, lr=0.05, batch_size=128)
    how = BaselineConfig(pretrained=tmp_path_factory.mktemp("pretrained"), progress=False)
    return BaselineRunner(cfg, train, test, stage, how, Sources(oracle, pool_part, tmp_path_factory.mktemp("teachers")))


@pytest.mark.parametrize("method", METHODS)
def test_method_end_to_end(runner, method):
    result, net = runner.run(method, TASKS, keep=True)
    assert result.method == method and result.tasks == tuple(TASKS)
    assert result.n_test == 1000  # only the composite's test images are scored
    assert 0.0 <= result.accuracy <= 100.0
    head = net[1]
    assert head.width == 16 * len(TASKS) and head.num_classes == 10
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert result.macs > 18_000_000 and result.params == sum(p.numel() for p in net.parameters())
    assert result.seconds > 0


def test_transfer_keeps_the_library_frozen(runner):
    before = {k: v.clone() for k, v in runner.pool_part(None).state_dict().items()}
    _, net = runner.run("transfer", TASKS, keep=True)
    for k, v in net[0].state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unknown_method(runner):
    with pytest.raises(PoEError, match="unknown method 'distill'; known methods: scratch"):
        runner.run("distill", TASKS)


def test_sd_and_uhc_losses_by_hand():
    s = torch.tensor([[1.0, 0.0, 2.0]])
    t = torch.tensor([[0.0, 1.0]])
    cols = torch.tensor([2, 0])
    T = 1.0
    p = torch.softmax(t, 1)
    q_all = torch.softmax(s, 1)[0, cols]
    q_res = torch.softmax(s[:, cols], 1)[0]
    want_sd = (p[0] * (p[0].log() - q_all.log())).sum()
    want_uhc = (p[0] * (p[0].log() - q_res.log())).sum()
    assert padded_kd(s, t, cols, T).item() == pytest.approx(want_sd.item(), rel=1e-5)
    assert restricted_kd(s, t, cols, T).item() == pytest.approx(want_uhc.item(), rel=1e-5)
    # a student whose restricted softmax equals the teacher's has zero UHC loss but positive SD loss
    s2 = torch.tensor([[5.0, 9.0, 4.0]])
    assert restricted_kd(s2, t, cols, T).item() == pytest.approx(0.0, abs=1e-6)
    assert padded_kd(s2, t, cols, T).item() > 0.1


def test_baselines_command_prints_methods_beside_poe(capsys, official_cifar, few_train_root):
    import json

    from PoE.cli import main_baselines

    rc = main_baselines(
        [
            "--queriedTask",
            "people",
            "vehicles_1",
            "--method",
            "transfer",
            "--epochs",
            "1",
            "--batch_size",
            "256",
            "--db",
            str(official_cifar),
            "--data_root",
            str(few_train_root),
            "--no_progress",
            "--device",
            "cpu",
            "--json",
        ]
    )
    assert rc == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["method"] for r in rows] == ["transfer", "poe"]
    assert rows[1]["accuracy"] == pytest.approx(74.70, abs=0.01) and rows[0]["n_test"] == 1000
    assert main_baselines(["--queriedTask", "people", "--schedule", "cosine", "--db", str(official_cifar)]) == 2
    assert "argument --schedule: invalid choice: 'cosine'" in capsys.readouterr().err


def test_ckd_from_cached_oracle_views(runner):
    """--ckd_views 2: the Oracle's logits are computed once per view of the query's images and cached; the
    student trained on them is the same network as with the Oracle run on every batch."""
    runner.ckd_views = 2
    try:
        result = runner.run("ckd", TASKS)
    finally:
        runner.ckd_views = 0
    assert result.method == "ckd" and 0.0 <= result.accuracy <= 100.0 and result.seconds > 0
    cached = sorted(p.name[-11:] for p in (runner.teacher_dir / "ckd_people+vehicles_1").glob("teacher_*.pt"))
    assert cached == ["view0000.pt"]  # one epoch uses one of the two views; only it is made


def test_a_new_method_is_one_module_and_one_registry_line(runner, monkeypatch):
    """A module of PoE.build.baselines with ``build(name)`` and its line in ``METHODS`` is all a method needs: the
    runner trains it, and the comparisons' record keys and tables know it."""
    import sys
    import types

    import torch.nn.functional as F

    from PoE.build import baselines
    from PoE.build.baselines.base import Loss, Method
    from PoE.experiments import record_key

    class Smoothed(Method):
        uses = ("library",)
        on_library = True

        def loss(self, ctx):
            return Loss(lambda out, b: F.cross_entropy(out, b.y, label_smoothing=0.1))

    module = types.ModuleType("PoE.build.baselines.smoothed")
    module.build = lambda name: Smoothed()
    monkeypatch.setitem(sys.modules, "PoE.build.baselines.smoothed", module)
    monkeypatch.setitem(baselines.METHODS, "smoothed", "smoothed")
    result = runner.run("smoothed", TASKS)
    assert result.method == "smoothed" and result.epochs == 1 and result.n_test == 1000
    assert baselines.budget_epochs("smoothed", 0.5) == 50  # a head on the library: the paper's 100 epochs
    pool = Pool.open(SHIPPED_POOL / "cifar100")
    assert record_key("smoothed", tuple(TASKS), "f", pool, "oracle-id").split()[-1] == pool.part_id(None)


def test_an_unknown_method_is_one_line():
    from PoE.build.baselines import method

    with pytest.raises(PoEError, match="unknown method 'distill'; known methods: scratch, transfer, ckd"):
        method("distill")
