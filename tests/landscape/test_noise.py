"""Gradient noise against per-example gradients taken one example at a time in a
Python loop, reduced with numpy."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m


@pytest.fixture(scope="module")
def setup():
    params = m.mlp_params(jax.random.key(1), sizes=(5, 6, 3))
    x, y = m.classification_data(jax.random.key(2), n=26)
    grad = jax.jit(jax.grad(m.ce_loss))  # one example per call, in a plain loop
    grads = np.stack([np.asarray(ravel_pytree(grad(params, (x[i:i + 1], y[i:i + 1])))[0])
                      for i in range(26)])
    return params, (x, y), grads


def test_noise_scale_matches_brute_force(setup):
    params, batch, g = setup
    n = g.shape[0]
    mean = g.mean(0)
    trace_cov = np.sum((g - mean) ** 2) / (n - 1)
    grad_sq = mean @ mean - trace_cov / n
    for chunk in (None, 7):
        ns = ls.gradient_noise_scale(m.ce_loss, params, batch, chunk_size=chunk)
        np.testing.assert_allclose(ns.trace_cov, trace_cov, rtol=1e-10)
        np.testing.assert_allclose(ns.mean_grad_sq_norm, mean @ mean, rtol=1e-10)
        np.testing.assert_allclose(ns.grad_sq_norm, grad_sq, rtol=1e-10)
        np.testing.assert_allclose(ns.simple, trace_cov / grad_sq, rtol=1e-10)
        assert ns.num_examples == n


def test_gradient_snr_matches_brute_force(setup):
    params, batch, g = setup
    mean, var = g.mean(0), g.var(0, ddof=1)
    ref = np.where(var > 0, mean**2 / np.where(var > 0, var, 1), 0.0)
    snr = ls.gradient_snr(m.ce_loss, params, batch, chunk_size=10)
    np.testing.assert_allclose(ravel_pytree(snr.per_parameter)[0], ref, rtol=1e-8,
                               atol=1e-14)
    np.testing.assert_allclose(snr.mean, ref[var > 0].mean(), rtol=1e-8)


def test_minibatch_variance_follows_the_finite_population_formula(setup):
    params, batch, g = setup
    n = g.shape[0]
    trace_cov = np.sum((g - g.mean(0)) ** 2) / (n - 1)
    sizes = [1, 4, 13, n]
    mv = ls.minibatch_variance(m.ce_loss, params, batch, sizes, key=jax.random.key(3),
                               num_batches=400)
    pred = trace_cov / np.array(sizes) * (1 - np.array(sizes) / n)
    np.testing.assert_allclose(mv.predicted, pred, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(mv.measured[-1], 0.0, atol=1e-20)  # the whole population
    for k in range(3):
        assert abs(mv.measured[k] - pred[k]) < 4 * mv.std_error[k]
        assert mv.std_error[k] < 0.15 * pred[k]


def test_bad_noise_inputs(setup):
    params, batch, _ = setup
    one = jax.tree.map(lambda x: x[:1], batch)
    with pytest.raises(ValueError, match="2 examples"):
        ls.gradient_noise_scale(m.ce_loss, params, one)
    with pytest.raises(ValueError, match="batch_sizes"):
        ls.minibatch_variance(m.ce_loss, params, batch, [0, 4], key=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_sizes"):
        ls.minibatch_variance(m.ce_loss, params, batch, [100], key=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_sizes"):
        ls.minibatch_variance(m.ce_loss, params, batch, [], key=jax.random.key(0))
    with pytest.raises(ValueError, match="chunk_size"):
        ls.gradient_snr(m.ce_loss, params, batch, chunk_size=0)
