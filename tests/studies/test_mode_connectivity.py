"""Mode connectivity (Garipov et al. 2018): the pieces against direct evaluation, the
summary as defined, and (slow) the claim on a reduced budget: a high barrier on the
straight line between two seeds' MLPs, a low one on the trained Bezier curve."""

import jax
import numpy as np
import pytest

import experiments
from experiments import studies
from experiments.studies import mode_connectivity as mc

SMALL = ["data.num_train=256", "data.num_test=128", "model.hidden=[16]",
         "train.steps=50", "train.batch_size=64", "curve.steps=20", "curve.batch_size=64",
         "curve.num_points=5", 'curve.kinds=["bezier"]']


def test_the_linear_path_is_the_loss_at_its_points():
    cfg = experiments.load("mode_connectivity", SMALL)   # untrained endpoints will do
    _, loss_fn, error_fn, a, b, train, test = mc.setup(cfg)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert not all(np.allclose(x, y) for x, y in zip(jax.tree.leaves(a),
                                                     jax.tree.leaves(b)))  # two seeds
    lin = mc.linear(cfg, loss_fn, error_fn, a, b, train, test)
    np.testing.assert_allclose(lin["t"], np.linspace(0, 1, 5))
    mid = jax.tree.map(lambda x, y: 0.5 * x + 0.5 * y, a, b)
    np.testing.assert_allclose(lin["train_loss"][2], loss_fn(mid, train), rtol=1e-5)
    np.testing.assert_allclose(lin["test_error"][2], error_fn(mid, test), atol=1e-6)
    line = np.linspace(lin["train_loss"][0], lin["train_loss"][-1], 5)
    assert lin["barrier"] == pytest.approx(np.max(np.asarray(lin["train_loss"]) - line),
                                           rel=1e-5)


@pytest.mark.slow
def test_the_curve_piece_passes_through_the_endpoints():
    cfg = experiments.load("mode_connectivity", SMALL)
    _, loss_fn, error_fn, a, b, train, test = mc.setup(cfg)
    lin = mc.linear(cfg, loss_fn, error_fn, a, b, train, test)
    c = mc.curve(cfg, "bezier", loss_fn, error_fn, a, b, train, test)
    assert c["train_loss"][0] == pytest.approx(lin["train_loss"][0], rel=1e-6)
    assert c["test_error"][-1] == pytest.approx(lin["test_error"][-1], abs=1e-7)
    assert len(c["training"]) == 20   # one mean per window of the 20 steps


def test_summary_reads_the_paths_as_defined(tmp_path):
    t = [0.0, 0.5, 1.0]
    done = {"linear": {"t": t, "barrier": 2.0, "barrier_mean": 2.0,
                       "train_loss": [0.1, 2.1, 0.1], "test_loss": [1, 3, 1],
                       "test_error": [0.3, 0.8, 0.32]},
            "curve/bezier": {"t": t, "barrier": 0.05, "barrier_mean": 0.05,
                             "train_loss": [0.1, 0.15, 0.1], "test_loss": [1, 1, 1],
                             "test_error": [0.3, 0.29, 0.32], "training": [1.0]}}
    rows = mc.summary(done)
    assert list(rows) == ["linear", "bezier"]
    assert rows["linear"]["worst_error"] == 0.8 and rows["linear"]["worst_t"] == 0.5
    assert rows["bezier"]["end_error"] == pytest.approx(0.31)
    assert rows["bezier"]["worst_error"] == 0.32 and rows["bezier"]["worst_t"] == 1.0
    cfg = experiments.load("mode_connectivity")
    studies.save_json(tmp_path / "config.json", cfg)
    studies.save_json(tmp_path / studies.RESULTS, done)
    lines = mc.report(tmp_path)
    assert (tmp_path / "mode_connectivity.png").stat().st_size > 5000
    assert any(line.startswith("| linear | 2 |") for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_straight_path_meets_a_barrier_the_curve_avoids(tmp_path):
    # Reduced budget: 1000 examples, 1500 steps for each endpoint and curve.
    res = experiments.run("mode_connectivity", out=tmp_path / "mc", overrides=[
        "data.num_train=1000", "train.steps=1500", "curve.steps=1500",
        'curve.kinds=["bezier"]'])
    rows = mc.summary(studies.results(res.path))
    lin, bez = rows["linear"], rows["bezier"]
    assert lin["barrier"] > 1.0, lin                      # a real barrier on the line
    assert lin["worst_error"] > lin["end_error"] + 0.2, lin
    assert bez["barrier"] < 0.15 * lin["barrier"], bez    # the curve avoids it
    assert bez["worst_error"] < bez["end_error"] + 0.02, bez
    assert experiments.write_report(res.path).is_file()
