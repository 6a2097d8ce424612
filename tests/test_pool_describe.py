"""``Pool.describe`` (``/api/pool``, ``--list``): the experts' accuracies as a person reads them."""

from __future__ import annotations

import json

from PoE.query.pool import Pool

from .conftest import ROOT


def test_describe_rounds_the_accuracies_to_2_decimals():
    pool = Pool.open(ROOT / "DB_PoE", "cifar100")
    raw = pool.expert_meta["aquatic_mammals"]["test_acc"]
    assert raw != round(raw, 2)  # the file holds float32 noise (68.00000071525574)
    tasks = {t["name"]: t for t in pool.describe()["tasks"]}
    assert tasks["aquatic_mammals"]["accuracy"] == round(raw, 2) == 68.0
    for t in tasks.values():
        assert len(json.dumps(t["accuracy"]).partition(".")[2]) <= 2, t
