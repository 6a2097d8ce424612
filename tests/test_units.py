"""Unit tests: losses, networks, hierarchy, augmentation, consolidation, storage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from PoE.build.losses import ckd_loss, kd_loss, scale_loss
from PoE.build.profiles import StageConfig
from PoE.core.checkpoint import atomic_write, load_checkpoint, load_into, save_checkpoint
from PoE.core.data import ImageSet
from PoE.core.datasets import DATASETS, cifar100, tinyimagenet
from PoE.core.errors import PoEError
from PoE.core.evaluate import count_macs, count_params, cross_expert_share
from PoE.core.loaders import crop_flip, view_params
from PoE.core.networks import WideResNet, WRNLibrary, WRNSpec
from PoE.core.networks.wrn import expert_from_state, new_expert
from PoE.core.query import make_query

from .conftest import check_disjoint, consolidated


# ------------------------------------------------------------------ losses
def test_kd_loss_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 1.0, 0.0]])
    T = 2.0
    p = [math.exp(v / T) for v in (3.0, 1.0, 0.0)]
    p = [v / sum(p) for v in p]
    q = [math.exp(v / T) for v in (1.0, 2.0, 3.0)]
    q = [v / sum(q) for v in q]
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True)) * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_averages_over_batch_not_classes():
    s = torch.randn(4, 7)
    t = torch.randn(4, 7)
    per_sample = [kd_loss(s[i : i + 1], t[i : i + 1], 4.0).item() for i in range(4)]
    assert kd_loss(s, t, 4.0).item() == pytest.approx(sum(per_sample) / 4, rel=1e-5)


def test_scale_and_ckd_loss():
    s = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    t = torch.tensor([[2.0, 1.0], [0.5, 0.0]])
    assert scale_loss(s, t).item() == pytest.approx((1 + 2 + 0 + 2) / 4)
    both = ckd_loss(s, t, 4.0, 0.3)
    assert both.item() == pytest.approx(kd_loss(s, t, 4.0).item() + 0.3 * 1.25, rel=1e-6)
    assert ckd_loss(s, t, 4.0, 0.3, scale=False).item() == pytest.approx(kd_loss(s, t, 4.0).item())
    assert ckd_loss(s, t, 4.0, 0.3, soft=False).item() == pytest.approx(0.3 * 1.25)


# ------------------------------------------------------------------ networks
def test_wrn_shapes_and_split():
    net = WideResNet(WRNSpec(16, 1), 100).eval()
    x = torch.randn(2, 3, 32, 32)
    f = net.front(x)
    assert f.shape == (2, 32, 16, 16)
    assert net(x).shape == (2, 100)
    expert = new_expert(net.front, 16, 5)
    assert expert(f).shape == (2, 5)
    tiny = WideResNet(WRNSpec(16, 2, first_stride=2), 200).eval()
    assert tiny.front(torch.randn(1, 3, 64, 64)).shape == (1, 64, 16, 16)


def test_wrn_spec_parse_and_validation():
    assert WRNSpec.parse("wrn-40-4") == WRNSpec(40, 4)
    assert WRNSpec(40, 4).blocks_per_group == 6
    with pytest.raises(ValueError, match="6n\\+4"):
        WRNSpec(15, 1)
    with pytest.raises(ValueError, match="wrn-<depth>-<widen>"):
        WRNSpec.parse("resnet50")


def test_official_checkpoints_load_with_inferred_shapes(official_cifar):
    from PoE.core.networks.wrn import library_spec_from_state

    sd = load_checkpoint(official_cifar / "library_cifar100.pt")
    spec = library_spec_from_state(sd, 1)
    assert spec == WRNSpec(16, 1)
    load_into(WRNLibrary(spec), sd, "lib", "library")
    esd = load_checkpoint(official_cifar / "experts" / "expert_people.pt")
    e = expert_from_state(esd)
    assert (e.in_channels, e.width, e.num_classes, e.n_blocks) == (32, 16, 5, 2)
    load_into(e, esd, "expert", "expert")
    head = load_checkpoint(official_cifar / "library_student_classifier_cifar100.pt")
    assert expert_from_state(head).width == 64


# ------------------------------------------------------------------ hierarchy
def test_cifar_superclasses_partition_the_100_classes():
    assert len(cifar100.TASKS) == 20
    flat = sorted(c for cls in cifar100.TASKS.values() for c in cls)
    assert flat == list(range(100))
    assert all(len(v) == 5 for v in cifar100.TASKS.values())


def test_tinyimagenet_groups_are_disjoint_and_in_range():
    check_disjoint(tinyimagenet.TASKS)
    assert len(tinyimagenet.TASKS) == 34
    assert all(0 <= c < 200 for cls in tinyimagenet.TASKS.values() for c in cls)
    for cfg in DATASETS.values():
        check_disjoint(cfg.tasks)
        assert set(cfg.default_tasks) <= set(cfg.tasks)


def test_query_positions():
    table = {"a": [7, 2], "b": [5, 1, 9]}
    q = make_query(["b", "a"], table)
    assert q.concat_classes == [5, 1, 9, 7, 2]
    assert q.classes == [1, 2, 5, 7, 9]
    assert [q.concat_classes[i] for i in q.order] == q.classes
    assert q.owner() == [0, 1, 0, 1, 0]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "empty query"),
        (["people", "nope"], "unknown task 'nope'"),
        (["people", "people"], "named twice"),
    ],
)
def test_query_errors(names, message):
    with pytest.raises(PoEError, match=message):
        make_query(names, cifar100.TASKS, "cifar100")


def test_unknown_task_lists_the_known_ones():
    with pytest.raises(PoEError) as e:
        make_query(["nope"], cifar100.TASKS, "cifar100")
    assert all(t in str(e.value) for t in cifar100.TASKS)


# ------------------------------------------------------------------ data
def test_crop_flip_matches_per_image_reference():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    params = view_params(6, 2, seed=3, view=1)
    out = crop_flip(x, params, 2)
    for i in range(6):
        dy, dx, flip = params[i].tolist()
        ref = F.pad(x[i], (2, 2, 2, 2))[:, dy : dy + 8, dx : dx + 8]
        if flip:
            ref = ref.flip(2)
        assert torch.equal(out[i], ref)


def test_views_are_reproducible_and_differ():
    assert torch.equal(view_params(100, 4, 0, 5), view_params(100, 4, 0, 5))
    assert not torch.equal(view_params(100, 4, 0, 5), view_params(100, 4, 0, 6))
    p = view_params(1000, 4, 0, 0)
    assert p[:, :2].min() == 0 and p[:, :2].max() == 8 and set(p[:, 2].tolist()) == {0, 1}


def test_with_classes_remaps_labels_in_given_order():
    data = ImageSet(torch.zeros(5, 3, 2, 2, dtype=torch.uint8), torch.tensor([3, 1, 4, 1, 5]))
    sub, labels = data.with_classes([4, 1])
    assert labels.tolist() == [1, 0, 1]
    assert len(sub) == 3


# ------------------------------------------------------------------ schedules
def test_step_and_onecycle_schedules():
    step = StageConfig(epochs=200, lr=0.1)
    assert step.lr_at(0) == pytest.approx(0.1)
    assert step.lr_at(80) == pytest.approx(0.01)
    assert step.lr_at(159.9) == pytest.approx(0.01)
    assert step.lr_at(160) == pytest.approx(0.001)
    one = StageConfig(epochs=10, lr=0.2, schedule="onecycle", warmup=0.2)
    assert one.lr_at(0) == pytest.approx(0.02)
    assert one.lr_at(2) == pytest.approx(0.2)
    assert one.lr_at(10) == pytest.approx(0.0, abs=1e-9)
    assert one.lr_at(6) == pytest.approx(0.1)


# ------------------------------------------------------------------ consolidation
def constant_expert(library, classes: list[int]):
    """An expert whose logits are exactly its class ids, whatever the input."""
    e = new_expert(library, 16, len(classes)).eval()
    with torch.no_grad():
        e.fc.weight.zero_()
        e.fc.bias.copy_(torch.tensor(classes, dtype=torch.float))
    return e


def test_consolidated_logits_land_at_their_class_positions():
    table = {"a": [7, 2, 40], "b": [5, 1], "c": [30, 3]}
    q = make_query(["c", "a", "b"], table)
    lib = WRNLibrary(WRNSpec(16, 1)).eval()
    model = consolidated(lib, [constant_expert(lib, table[t]) for t in q.tasks], q).eval()
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7)
    assert out[0].tolist() == [1.0, 2.0, 3.0, 5.0, 7.0, 30.0, 40.0] == [float(c) for c in q.classes]


def test_consolidated_model_equals_running_each_expert():
    torch.manual_seed(0)
    lib = WRNLibrary(WRNSpec(16, 1)).eval()
    table = {k: cifar100.TASKS[k] for k in ("people", "trees", "fish")}
    q = make_query(list(table), table)
    experts = [new_expert(lib, 16, 5).eval() for _ in q.tasks]
    model = consolidated(lib, experts, q).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        f = lib(x)
        for e, classes in zip(experts, q.task_classes, strict=True):
            cols = [q.classes.index(c) for c in classes]
            torch.testing.assert_close(out[:, cols], e(f))


def test_cross_expert_share_on_hand_built_case():
    owner = [0, 0, 1, 1, 2]
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    pred = torch.tensor([0, 0, 4, 3, 2, 4, 3])
    # wrong: (1->0 same expert), (2->4 cross), (4->2 cross), (0->3 cross)
    assert cross_expert_share(pred, labels, owner) == (3, 4)


def test_macs_and_params_of_a_three_task_model():
    lib = WRNLibrary(WRNSpec(16, 1))
    table = {"a": [0, 1, 2, 3, 4], "b": [5, 6, 7, 8, 9], "c": [10, 11, 12, 13, 14]}
    q = make_query(list(table), table)
    experts = [new_expert(lib, 16, 5) for _ in range(3)]
    model = consolidated(lib, experts, q)
    # by hand: library 18.33M; each expert 0.41M multiply-adds (conv) + 80 (fc)
    lib_macs = 3 * 16 * 9 * 32 * 32 + 4 * 16 * 16 * 9 * 32 * 32 + (16 * 32 * 9 + 3 * 32 * 32 * 9 + 16 * 32) * 16 * 16
    exp_macs = (32 * 16 * 9 + 3 * 16 * 16 * 9 + 32 * 16) * 8 * 8 + 16 * 5
    assert count_macs(model, (3, 32, 32)) == lib_macs + 3 * exp_macs
    assert count_params(model) == sum(p.numel() for p in lib.parameters()) + 3 * sum(
        p.numel() for p in experts[0].parameters()
    )


# ------------------------------------------------------------------ storage
def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.pt"

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert list(tmp_path.iterdir()) == []
    save_checkpoint(target, {"a": torch.ones(2)})
    assert torch.equal(load_checkpoint(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]


def test_corrupt_and_missing_checkpoints_name_the_file(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(PoEError, match=r"bad\.pt is not a readable PyTorch checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(PoEError, match=r"missing checkpoint .*nothere\.pt; run this"):
        load_checkpoint(tmp_path / "nothere.pt", "run this")


def test_mismatched_state_dict_names_the_file():
    lib = WRNLibrary(WRNSpec(16, 1))
    sd = WRNLibrary(WRNSpec(16, 2)).state_dict()
    with pytest.raises(PoEError, match=r"lib\.pt does not match the library it should hold: .*shape mismatch"):
        load_into(lib, sd, "lib.pt", "library")


def test_cifar100_is_fetched_through_torchvision_once_and_cached(tmp_path, monkeypatch):
    import numpy as np
    import torchvision

    from PoE.core.datasets import load_split

    class FakeCIFAR100:  # what torchvision's dataset exposes after a download
        def __init__(self, root, train, download):
            assert download
            n = 7 if train else 3
            self.data = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
            self.targets = list(range(n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    first = load_split("cifar100", tmp_path, "test")
    assert first.x.shape == (3, 3, 32, 32) and first.y.tolist() == [0, 1, 2]
    assert (tmp_path / "cifar100" / "test.npz").is_file()

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    assert torch.equal(load_split("cifar100", tmp_path, "test").x, first.x)  # from the cache
    with pytest.raises(PoEError, match=r"torchvision download failed .*--data_root"):
        load_split("cifar100", tmp_path, "train")
    assert not (tmp_path / "cifar100" / "train.npz").exists()


def test_a_short_junk_file_is_refused_as_a_checkpoint_in_one_line(tmp_path):
    """A few bytes that are neither a zip nor a pickle (torch raises struct.error) are a PoEError, not a traceback."""
    junk = tmp_path / "junk.pt"
    junk.write_text("junk\n")
    with pytest.raises(PoEError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(junk)


def test_more_workers_than_four_per_cpu_are_refused():
    from PoE.query.service.run import plan

    assert plan(8, None, n_cpus=2) == (8, 1)
    with pytest.raises(PoEError, match="more than 4 per CPU"):
        plan(9, None, n_cpus=2)


def test_the_suite_runs_one_process_per_core_but_one_file_or_s_in_this_one():
    """conftest's ``-n auto``: 0 (this process) for one file, a test in it, or -s; else one per core, at most 4."""
    from types import SimpleNamespace

    from .conftest import ROOT, pytest_xdist_auto_num_workers, usable_cpus

    def workers(*args: str, capture: str = "fd") -> int:
        return pytest_xdist_auto_num_workers(SimpleNamespace(args=list(args), option=SimpleNamespace(capture=capture)))

    one = str(ROOT / "tests" / "test_units.py")
    assert workers(one) == workers(one + "::test_x", one) == 0
    assert workers(str(ROOT / "tests"), capture="no") == 0
    assert workers(str(ROOT / "tests")) == workers(one, str(ROOT / "tests" / "test_bank.py")) == min(usable_cpus(), 4)
