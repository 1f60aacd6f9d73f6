"""Memorization (Zhang et al. 2017): λ_max is read at equal training loss from the
records, and on a reduced budget a network fits even fully random labels while its
test accuracy stays at chance and partial noise costs test accuracy."""

import math

import numpy as np
import pytest

import experiments
from experiments.studies import memorization as mem


def test_sharpness_is_read_where_the_loss_first_fell_below_the_level():
    train = [(100, 2.0), (200, 0.5), (300, 0.09), (400, 0.2), (500, 0.01)]
    lam = [(0, 9.0), (200, 7.0), (400, 5.0), (500, 3.0)]
    # No record at step 300 (the first window below 0.1); step 400 went back above
    # it, so the first record below the level is at step 500.
    assert mem.sharpness_at_loss(train, lam, 0.1) == 3.0
    assert mem.sharpness_at_loss(train, lam, 0.6) == 7.0
    assert math.isnan(mem.sharpness_at_loss(train, lam, 0.001))


@pytest.mark.slow
def test_random_labels_are_memorized_and_cost_test_accuracy(tmp_path):
    res = experiments.run("memorization", out=tmp_path / "run", overrides=[
        "data.num_train=300", "train.steps=1500", "record.every=500",
        "record.num_examples=300", "measure.num_examples=300",
        "sweep.data.label_noise=[0.0, 1.0]", "sweep.seed=[0]"])
    recs = {r["data.label_noise"]: r for r in res.records()}
    for r in recs.values():  # the proxy is driven to (near) zero whatever the labels
        assert r["status"] == "finished" and r["train_loss"] < 0.01
        assert r["train_accuracy"] == 1.0
    # Clean labels generalize above chance; random labels leave the test set at chance.
    assert recs[0.0]["test_accuracy"] > 0.25
    assert abs(recs[1.0]["test_accuracy"] - 0.1) < 0.06
    rows = mem.summary(res)
    assert [r["label_noise"] for r in rows] == [0.0, 1.0]
    assert all(np.isfinite(r["lambda_max_at_level"][0]) for r in rows)
    lines = mem.report(res.path)
    assert any(line.startswith("| 100% |") for line in lines)
    assert (res.path / "memorization.png").stat().st_size > 10_000
