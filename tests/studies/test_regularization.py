"""Regularization: for SGD the runner's L2 penalty and the optimizer's weight decay
are the same update, for Adam they are not; the study's table reads the pure-L2 row
and the pure-decoupled column of the grid; on a reduced budget both raise Adam's test
accuracy on a small training set, and the unregularized run overfits in test loss."""

import numpy as np
import pytest

import experiments
from experiments.studies import regularization as reg


def _tiny(tmp_path, name, **sweep):
    cfg = experiments.config.load("regularization", [
        "data.num_train=256", "data.num_test=128", "model.hidden=[16]", "train.steps=60",
        "train.record_every=20", "train.batch_size=32", "measure.num_examples=128",
        "measure.chunk_size=128", "measure.measures=['lambda_max']",
        "measure.lanczos_steps=5", f"optimizer.name='{name}'", "sweep.seed=[0]"]
        + [f"sweep.{k}={v}" for k, v in sweep.items()])
    return experiments.run(cfg, out=tmp_path / name).records()


def _cell(records, l2, wd):
    return next(r for r in records if r["train.l2"] == l2 and r["optimizer.weight_decay"] == wd)


@pytest.mark.slow
def test_l2_in_the_loss_equals_sgd_weight_decay_but_not_adamw(tmp_path):
    # SGD: θ ← θ − η(∇L + λθ) both ways (optax's add_decayed_weights against the
    # runner's ½λ‖θ‖² in the loss).
    sgd = _tiny(tmp_path, "sgd", **{"train.l2": [0.0, 0.05], "optimizer.weight_decay":
                                    [0.0, 0.05]})
    a, b, none = _cell(sgd, 0.05, 0.0), _cell(sgd, 0.0, 0.05), _cell(sgd, 0.0, 0.0)
    for key in ("train_loss", "test_loss", "test_accuracy"):  # (λ_max: per-member keys)
        assert a[key] == pytest.approx(b[key], rel=1e-4)
    assert abs(a["train_loss"] - none["train_loss"]) > 1e-4  # the penalty did something
    # AdamW: decoupled decay λ·η·θ against the penalty's gradient through Adam's
    # normalization: different points.
    adamw = _tiny(tmp_path, "adamw", **{"train.l2": [0.0, 0.05], "optimizer.weight_decay":
                                        [0.0, 0.05]})
    a, b = _cell(adamw, 0.05, 0.0), _cell(adamw, 0.0, 0.05)
    assert abs(a["train_loss"] - b["train_loss"]) > 1e-3


def test_pure_settings_reads_the_row_and_the_column():
    recs = []
    for i, (l2, wd, seed) in enumerate([(l2, wd, s) for l2 in (0.0, 0.01) for wd in (0.0, 1.0)
                                        for s in (0, 1)]):
        recs.append({"member": i, "train.l2": l2, "optimizer.weight_decay": wd, "seed": seed,
                     "train_loss": 0.1 * (i + 1), "test_accuracy": 0.5 + 0.01 * i,
                     "best_test_accuracy": 0.6, "best_test_step": 100.0 * (seed + 1),
                     "lambda_max": float(i)})
    rows = reg.pure_settings(recs)
    assert [(r["kind"], r["strength"]) for r in rows] == [
        ("none", 0.0), ("L2 in the loss", 0.01), ("decoupled (AdamW)", 1.0)]
    # Seed means: members 0,1 (none), 4,5 (l2 only), 2,3 (decay only).
    assert rows[0]["lambda_max"][0] == pytest.approx(0.5)
    assert rows[1]["lambda_max"][0] == pytest.approx(4.5)
    assert rows[2]["test_accuracy"][0] == pytest.approx(0.525)
    assert rows[2]["best_test_step"] == pytest.approx((150.0, 50.0))


@pytest.mark.slow
def test_both_regularizers_raise_test_accuracy_on_a_small_training_set(tmp_path):
    res = experiments.run("regularization", out=tmp_path / "run", overrides=[
        "train.steps=2000", "sweep.train.l2=[0.0, 0.01]",
        "sweep.optimizer.weight_decay=[0.0, 1.0]"])
    recs = res.records()
    none, l2, wd = _cell(recs, 0.0, 0.0), _cell(recs, 0.01, 0.0), _cell(recs, 0.0, 1.0)
    assert none["train_loss"] < 0.05  # the unregularized run fits the training set
    for r in (l2, wd):
        assert r["test_accuracy"] > none["test_accuracy"] + 0.02
        assert r["train_loss"] > 2 * none["train_loss"]
    # Early stopping's record: the best test accuracy and its step, from the curve.
    curve = res.curves("test_accuracy")[none["member"]]
    steps, acc = zip(*curve)
    assert none["best_test_accuracy"] == pytest.approx(max(acc))
    assert none["best_test_step"] == steps[int(np.argmax(acc))]
    rows = reg.pure_settings(recs, res.curves("test_loss"))
    # Overfitting shows in the test loss: the unregularized run ends above its lowest.
    assert rows[0]["kind"] == "none"
    assert rows[0]["final_test_loss"] > 1.2 * rows[0]["min_test_loss"][0]
    lines = reg.report(res.path)
    assert any(line.startswith("| L2 in the loss | 0.01 |") for line in lines)
