"""The optimizer shoot-out's table on a reduced budget: each optimizer's best point of
the shared grid, timings that exclude compilation, and the expected qualitative order
of step sizes (adaptive methods want smaller learning rates than SGD)."""

import json
import sqlite3

import numpy as np
import pytest

import experiments
from experiments.studies import shootout


def _rec(name, lr, seed, acc, status="finished"):
    return {"optimizer.name": name, "learning_rate": lr, "seed": seed, "status": status,
            "test_accuracy": acc, "train_loss": 1.0 - acc, "lambda_max": 10 * acc}


def test_best_point_is_the_best_mean_over_seeds():
    records = [_rec("sgd", 0.1, 0, 0.60), _rec("sgd", 0.1, 1, 0.50),   # mean 0.55
               _rec("sgd", 0.3, 0, 0.58), _rec("sgd", 0.3, 1, 0.56),   # mean 0.57: best
               _rec("sgd", 1.0, 0, 0.90, "diverged"), _rec("sgd", 1.0, 1, 0.90, "diverged"),
               _rec("adam", 1e-3, 0, 0.70), _rec("adam", 1e-3, 1, 0.72)]
    best = shootout.best_points(records)
    assert list(best) == ["adam", "sgd"]  # sorted by test accuracy
    assert best["sgd"]["learning_rate"] == 0.3 and best["sgd"]["diverged"] == 2
    assert best["sgd"]["test_accuracy"][0] == pytest.approx(0.57)
    assert best["sgd"]["test_accuracy"][1] == pytest.approx(np.std([0.58, 0.56], ddof=1))


@pytest.mark.slow
def test_shootout_table_on_a_reduced_budget(tmp_path):
    res = experiments.run("shootout_mlp", out=tmp_path / "run", overrides=[
        "data.num_train=1000", "model.hidden=[32]", "train.steps=400",
        "sweep.optimizer.name=['sgd', 'adam', 'sam']",
        "sweep.learning_rate=[0.001, 0.01, 0.1, 1.0]", "measure.num_examples=500"])
    records = res.records()
    best = shootout.best_points(records)
    assert set(best) == {"sgd", "adam", "sam"}
    assert all(b["test_accuracy"][0] > 0.3 for b in best.values()), best  # chance: 0.1
    assert best["adam"]["learning_rate"] < best["sgd"]["learning_rate"]

    # Runner timings are the store's group seconds less compilation, per group step.
    runner = shootout.runner_times(res.path)
    with sqlite3.connect(res.path / "results.sqlite") as conn:
        for key, seconds, compile_s in conn.execute(
                "SELECT key, seconds, compile_seconds FROM groups"):
            steps = conn.execute("SELECT MAX(steps) FROM members WHERE group_key = ?",
                                 (key,)).fetchone()[0]
            name = json.loads(key)["optimizer.name"]
            assert runner[name]["step"] == pytest.approx((seconds - compile_s) / steps)

    text = experiments.write_report(res.path).read_text()
    alone = json.loads((res.path / "step_times.json").read_text())
    assert set(alone) == set(best)
    assert all(0 < t["min"] <= t["step"] and t["compile"] > 0 for t in alone.values())
    assert "## Optimizer shoot-out" in text and (res.path / "shootout.png").is_file()
