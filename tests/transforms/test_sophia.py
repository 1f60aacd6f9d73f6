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


def _sophia_g_algorithm_3(params, batch, keys, *, lr, b1, b2, eps, wd, gamma, clip, k):
    """Liu et al. 2023, Algorithm 3 with the GNB estimator, written plainly (numpy)."""
    flat = lambda t: np.asarray(jax.flatten_util.ravel_pytree(t)[0])  # noqa: E731
    theta, unravel = jax.flatten_util.ravel_pytree(params)
    theta = np.asarray(theta)
    m, h = np.zeros_like(theta), np.zeros_like(theta)
    gnb = tx.gauss_newton_bartlett()
    for t, key in enumerate(keys, start=1):
        p = unravel(jnp.asarray(theta))
        g = flat(jax.grad(ce_loss)(p, batch))
        m = b1 * m + (1 - b1) * g
        if t % k == 1 % k:                       # t mod k = 1: refresh first
            est, _ = gnb.update(None, optax.EmptyState(), p,
                                output_fn=lambda q: mlp_apply(q, batch[0]), key=key)
            h = b2 * h + (1 - b2) * flat(est)
        theta = theta - lr * wd * theta
        theta = theta - lr * np.clip(m / np.maximum(gamma * h, eps), -clip, clip)
    return theta


@pytest.mark.parametrize("gamma", [0.01, 100.0])
def test_sophia_g_follows_algorithm_3(gamma):
    params = mlp_params(jax.random.key(0))
    batch = classification_data(jax.random.key(1))
    hyper = dict(b1=0.9, b2=0.95, eps=1e-8, gamma=gamma, clip_threshold=1.0,
                 update_interval=2, weight_decay=1e-2)
    opt = tx.make("sophia_g", learning_rate=1e-2, **hyper)     # order="paper", default
    step = jax.jit(functools.partial(tx.train_step, opt, ce_loss, apply_fn=mlp_apply))
    keys = [jax.random.key(100 + t) for t in range(5)]
    p, s = params, opt.init(params)
    for t, key in enumerate(keys):
        p, s, _ = step(p, s, batch, key, step=t)
    want = _sophia_g_algorithm_3(params, batch, keys, lr=1e-2, b1=0.9, b2=0.95, eps=1e-8,
                                 wd=1e-2, gamma=gamma, clip=1.0, k=2)
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(p)[0], want, rtol=1e-10,
                               atol=1e-12)


def test_sophia_g_optax_order_equals_optax_contrib_sophia_and_differs_from_the_paper():
    params = mlp_params(jax.random.key(0))
    batch = classification_data(jax.random.key(1))
    kw = dict(b1=0.9, gamma=100.0, update_interval=2, weight_decay=1e-3)
    ours = tx.make("sophia_g", learning_rate=1e-2, order="optax", **kw)
    paper = tx.make("sophia_g", learning_rate=1e-2, **kw)
    ref = optax.contrib.sophia(1e-2, hessian_diagonal_fn=tx.gauss_newton_bartlett(), **kw)
    key = jax.random.key(3)
    extra = dict(output_fn=lambda q: mlp_apply(q, batch[0]), key=key)
    g = jax.grad(ce_loss)(params, batch)
    u_ref, _ = ref.update(g, ref.init(params), params, **extra)
    u_ours = tx.train_step(ours, ce_loss, params, ours.init(params), batch, key,
                           apply_fn=mlp_apply).params
    u_paper = tx.train_step(paper, ce_loss, params, paper.init(params), batch, key,
                            apply_fn=mlp_apply).params
    want = optax.apply_updates(params, u_ref)
    for a, b in zip(jax.tree.leaves(u_ours), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    # optax's first step is -lr (sign(g) + wd w); the paper's divides by γ h_1 already
    delta = lambda q: jax.flatten_util.ravel_pytree(  # noqa: E731
        jax.tree.map(jnp.subtract, q, params))[0]
    d_optax, d_paper = delta(u_ours), delta(u_paper)
    np.testing.assert_allclose(d_optax, -1e-2 * (np.sign(jax.flatten_util.ravel_pytree(g)[0])
                                                 + 1e-3 * jax.flatten_util.ravel_pytree(
                                                     params)[0]), rtol=1e-10, atol=1e-14)
    assert np.linalg.norm(d_optax - d_paper) > 0.5 * np.linalg.norm(d_optax)


def test_sophia_g_refresh_stays_a_cond_with_an_unbatched_step():
    params = mlp_params(jax.random.key(0))
    batch = classification_data(jax.random.key(1))
    lrs = jnp.asarray([1e-2, 3e-2])
    states = jax.vmap(lambda lr: tx.make("sophia_g", learning_rate=lr).init(params))(lrs)

    def member(lr, state, step):
        opt = tx.make("sophia_g", learning_rate=lr)
        return tx.train_step(opt, ce_loss, params, state, batch, jax.random.key(0),
                             apply_fn=mlp_apply, step=step).params

    jaxpr = jax.make_jaxpr(jax.vmap(member, in_axes=(0, 0, None)))(lrs, states, 0)
    assert "cond" in str(jaxpr)
