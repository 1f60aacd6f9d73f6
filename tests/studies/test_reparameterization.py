"""Dinh et al.'s rescaling on a small trained ReLU MLP: the same function, the Hessian
moved to exactly D⁻¹HD⁻¹ (checked densely), adaptive sharpness unchanged."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import experiments
from experiments import config as cfglib
from experiments.studies import reparameterization as rp

SMALL = ["data.num_train=256", "data.num_test=128", "model.hidden=[12, 12]",
         "train.steps=150", "train.batch_size=64", "train.learning_rate=0.01",
         "measure.num_examples=256", "measure.chunk_size=256", "measure.lanczos_steps=40",
         "measure.ascent_steps=10"]


@pytest.fixture(scope="module")
def trained():
    cfg = experiments.load("reparameterization", SMALL)
    apply_fn, loss_fn, init, train, test = rp.setup(cfg)
    params = rp.train_model(cfg, loss_fn, init, train)
    batch = (train[0][:256], train[1][:256])
    return cfg, apply_fn, loss_fn, params, batch, test


@pytest.fixture(scope="module")
def untrained():
    """The identities hold at any point: a small network at its initialization."""
    cfg = experiments.load("reparameterization", SMALL + ["model.hidden=[6, 6]"])
    apply_fn, loss_fn, init, train, test = rp.setup(cfg)
    return cfg, apply_fn, loss_fn, init, (train[0][:64], train[1][:64]), test


def _dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    h = jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)
    return np.asarray(h, np.float64)


def _diag_scale(params, alpha):
    """The diagonal of D as a flat vector, by rescaling a tree of ones."""
    ones = jax.tree.map(lambda a: a * 0 + 1, params)
    return np.asarray(ravel_pytree(rp.rescale(ones, alpha, 0))[0], np.float64)


def test_rescaled_hessian_is_d_inverse_h_d_inverse(untrained):
    cfg, apply_fn, loss_fn, params, batch, test = untrained
    h = _dense_hessian(loss_fn, params, batch)
    for alpha in (3.0,):
        p = rp.rescale(params, alpha, 0)
        np.testing.assert_allclose(apply_fn(p, test[0]), apply_fn(params, test[0]),
                                   rtol=1e-5, atol=1e-5)
        d_inv = 1.0 / _diag_scale(params, alpha)
        want = d_inv[:, None] * h * d_inv[None, :]
        got = _dense_hessian(loss_fn, p, batch)
        scale = np.abs(want).max()
        np.testing.assert_allclose(got / scale, want / scale, atol=2e-5)


@pytest.mark.slow
def test_measures_against_the_dense_prediction(trained):
    cfg, apply_fn, loss_fn, params, batch, test = trained
    h = _dense_hessian(loss_fn, params, batch)
    blocks = rp.blocks(cfg, loss_fn, params, batch)
    np.testing.assert_allclose(blocks["lambda_max"], np.linalg.eigvalsh(h)[-1], rtol=2e-3)
    rows = {a: rp.measure(cfg, apply_fn, loss_fn, params, batch, test[0], a)
            for a in (0.25, 1.0, 4.0)}
    for alpha, r in rows.items():
        d_inv = 1.0 / _diag_scale(params, alpha)
        want = np.linalg.eigvalsh(d_inv[:, None] * h * d_inv[None, :])[-1]
        np.testing.assert_allclose(r["lambda_max"], want, rtol=2e-3)
        np.testing.assert_allclose(r["lambda_max_predicted"], want, rtol=2e-3)
        # The block bounds derived in the module docstring.
        assert r["lambda_max"] >= alpha ** 2 * blocks["lambda_outgoing"] * (1 - 2e-3)
        assert r["lambda_max"] >= alpha ** -2 * blocks["lambda_incoming"] * (1 - 2e-3)
        assert r["lambda_max"] <= max(alpha ** 2, alpha ** -2) * blocks["lambda_max"] * (
            1 + 2e-3)
        assert r["output_change"] < 1e-5
        np.testing.assert_allclose(r["adaptive"], rows[1.0]["adaptive"], rtol=1e-3)
    assert rows[4.0]["worst_case"] > 2 * rows[1.0]["worst_case"]
    assert rows[4.0]["lambda_max"] > 4 * rows[1.0]["lambda_max"]


def test_bad_config_is_one_line_error():
    with pytest.raises(cfglib.ConfigError, match="rescale.layer"):
        experiments.load("reparameterization", ["rescale.layer=2"])
    with pytest.raises(cfglib.ConfigError, match="rescale.alphas"):
        experiments.load("reparameterization", ["rescale.alphas=[1.0, -2.0]"])


@pytest.mark.slow
def test_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    import experiments

    res = experiments.run("reparameterization",
                          overrides=SMALL + ["rescale.alphas=[0.5, 1.0, 2.0]"], out=tmp_path)
    done = res.summary()
    assert {"trained", "blocks", "alpha=0.5", "alpha=1", "alpha=2"} <= set(done)
    monkeypatch.setattr(rp, "measure", lambda *a: pytest.fail("recomputed"))
    monkeypatch.setattr(rp, "train_model", lambda *a: pytest.fail("retrained"))
    experiments.run(resume=tmp_path)
    lines = rp.report(tmp_path)
    assert (tmp_path / "reparameterization.png").is_file()
    assert sum(line.startswith("| ") for line in lines) == 1 + 3
