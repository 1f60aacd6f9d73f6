"""Saddles dominate, on a reduced budget: the index of the points found grows with their
loss, and only points below the tolerance are called critical."""

import jax
import numpy as np
import pytest
from scipy import stats

import experiments
from experiments import config as cfglib
from experiments import studies
from experiments.studies import saddles as sd


@pytest.mark.slow
def test_index_grows_with_loss(tmp_path):
    res = experiments.run("saddles", overrides=["checkpoints=5", "perturbations=1", "train_steps=1000",
                                    "finder.steps=60", "finder.cg_steps=30"], out=tmp_path)
    pts = sd.points_of(res.path)
    assert len(pts) == 10
    for p in pts:   # the flag is the tolerance, nothing else
        assert p["converged"] == (p["grad_norm"] <= p["tol"])
        assert p["grad_norm"] < p["start_grad_norm"]
    loss = [p["loss"] for p in pts]
    index = [p["index"] for p in pts]
    assert stats.kendalltau(loss, index).statistic > 0.5
    assert stats.spearmanr(loss, index).statistic > 0.6
    # the lowest-loss point is (close to) a minimum, the highest-loss one a saddle
    assert index[int(np.argmin(loss))] < 0.01 < index[int(np.argmax(loss))]
    assert "converged" in experiments.write_report(res.path).read_text()


def test_bad_config_is_a_config_error():
    with pytest.raises(cfglib.ConfigError, match="finder.method"):
        experiments.load("saddles", ['finder.method="newton"'])
    with pytest.raises(cfglib.ConfigError, match="tol_relative"):
        experiments.load("saddles", ["finder.tol_relative=0"])


def test_starts_follow_plain_gradient_descent():
    """The trajectory (`experiments.loop.fit` segment by segment) against GD written
    here, θ ← θ − η ∇L(θ), at every checkpoint; perturbed starts sit around them."""
    cfg = experiments.load("saddles", ["num_examples=32", "hidden=4", "train_steps=30",
                                       "checkpoints=4", "perturbations=1"])
    batch = studies.standardized_mnist1d(cfg["num_examples"])
    loss_fn = sd.make_loss(cfg["weight_decay"])
    points, where = sd.starts(cfg, loss_fn, batch)
    keep = sd.checkpoint_steps(cfg)
    assert [w["step"] for w in where] == keep * 2 and len(set(keep)) == len(keep) > 2
    theta = sd.init(jax.random.key(cfg["seed"]), [batch[0].shape[1], cfg["hidden"], 10])
    grad = jax.jit(jax.grad(loss_fn))
    for t in range(keep[-1] + 1):
        if t in keep:
            got = points[keep.index(t)]
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(theta)):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        theta = jax.tree.map(lambda p, g: p - cfg["learning_rate"] * g, theta,
                             grad(theta, batch))
    for base, kicked in zip(points[:len(keep)], points[len(keep):]):
        diff = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(base),
                                                    jax.tree.leaves(kicked))]
        assert 0 < max(diff) < 10
