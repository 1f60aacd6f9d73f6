"""Sophia-H (optax's) through `make`, and Sophia-G's Gauss-Newton-Bartlett estimator."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import landscape as ls
import transforms as tx
from tests.landscape.models import ce_loss, classification_data, mlp_apply, mlp_params


def test_sophia_h_via_make_equals_optax_contrib_sophia():
    params = mlp_params(jax.random.key(0))
    batch = classification_data(jax.random.key(1))
    kw = dict(b1=0.9, gamma=0.05, update_interval=2, weight_decay=1e-3)
    ours = tx.make("sophia_h", learning_rate=1e-2, **kw)        # seed 0, optax's default
    ref = optax.contrib.sophia(1e-2, **kw)
    step = jax.jit(functools.partial(tx.train_step, ours, ce_loss))

    @jax.jit
    def ref_step(p, s):
        g = jax.grad(ce_loss)(p, batch)
        u, s = ref.update(g, s, p, obj_fn=lambda q: ce_loss(q, batch))
        return optax.apply_updates(p, u), s

    p, s, q, r = params, ours.init(params), params, ref.init(params)
    for t in range(7):
        p, s, _ = step(p, s, batch, jax.random.key(100 + t))
        q, r = ref_step(q, r)
        for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(q)):
            np.testing.assert_allclose(a, b, atol=1e-12, rtol=0)


def _linear_apply(params, x):
    return x @ params["w"] + params["b"]


def test_gauss_newton_bartlett_matches_algorithm_2_in_numpy():
    kx, kw, kk = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (13, 4))
    params = {"w": jax.random.normal(kw, (4, 3)), "b": jnp.array([0.1, -0.2, 0.3])}
    est, _ = tx.gauss_newton_bartlett().update(
        None, optax.EmptyState(), params, output_fn=lambda p: _linear_apply(p, x), key=kk)

    # Liu et al. 2023, Algorithm 2, for logits z = x W + b, plainly in numpy.
    xn, wn, bn = np.asarray(x), np.asarray(params["w"]), np.asarray(params["b"])
    logits = xn @ wn + bn
    y_hat = np.asarray(jax.random.categorical(kk, jnp.asarray(logits), axis=-1))  # ŷ ~ softmax
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (p - np.eye(3)[y_hat]) / len(xn)          # ∂/∂z of (1/B) Σ CE(z_b, ŷ_b)
    g_w, g_b = xn.T @ dz, dz.sum(0)
    np.testing.assert_allclose(est["w"], len(xn) * g_w**2, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(est["b"], len(xn) * g_b**2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_gauss_newton_bartlett_is_unbiased_for_the_ggn_diagonal(loss):
    params = mlp_params(jax.random.key(3), sizes=(3, 4, 2))
    x, y = classification_data(jax.random.key(4), n=6, d=3, classes=2)
    targets = y if loss == "cross_entropy" else jax.nn.one_hot(y, 2)
    exact = np.diag(np.asarray(ls.ggn(mlp_apply, params, (x, targets), loss=loss).dense()))
    gnb = tx.gauss_newton_bartlett(loss)
    num = 4000

    @jax.jit
    def mean_and_sd(keys):
        def one(k):
            est, _ = gnb.update(None, optax.EmptyState(), params,
                                output_fn=lambda p: mlp_apply(p, x), key=k)
            return jax.flatten_util.ravel_pytree(est)[0]
        samples = jax.vmap(one)(keys)
        return samples.mean(0), samples.std(0) / np.sqrt(num)

    mean, se = mean_and_sd(jax.random.split(jax.random.key(5), num))
    np.testing.assert_array_less(np.abs(np.asarray(mean) - exact), 5 * np.asarray(se) + 1e-9)


def test_gauss_newton_bartlett_errors():
    with pytest.raises(ValueError, match="loss"):
        tx.gauss_newton_bartlett("hinge")
    params = mlp_params(jax.random.key(0))
    with pytest.raises(ValueError, match="output_fn"):
        tx.gauss_newton_bartlett().update(None, optax.EmptyState(), params,
                                          key=jax.random.key(0))
    opt = tx.make("sophia_g", learning_rate=1e-3)
    batch = classification_data(jax.random.key(1))
    with pytest.raises(ValueError, match="apply_fn"):
        tx.train_step(opt, ce_loss, params, opt.init(params), batch, jax.random.key(0))
