"""AdaHessian: its Hutchinson diagonal against a dense Hessian, its step against Algorithm 1."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import transforms as tx
from tests.landscape.models import ce_loss, classification_data, dense_hessian, mlp_params


def test_hutchinson_diagonal_converges_to_the_dense_hessian_diagonal():
    params = mlp_params(jax.random.key(0), sizes=(4, 6, 3))
    batch = classification_data(jax.random.key(1), n=20, d=4)
    h = np.asarray(jax.jit(lambda p: dense_hessian(ce_loss, p, batch))(params))
    diag = np.diag(h)
    # Per-entry variance of z ⊙ Hz with Rademacher z is Σ_{j≠i} H_ij².
    sd = np.sqrt((h**2).sum(1) - diag**2)

    @jax.jit
    def probes(key):
        one = lambda k: jax.flatten_util.ravel_pytree(  # noqa: E731
            tx.hutchinson_diagonal(lambda p: ce_loss(p, batch), params, k))[0]
        return jax.vmap(one)(jax.random.split(key, 2000))

    samples = np.asarray(probes(jax.random.key(2)))
    errors = []
    for n in (40, 2000):
        err = np.abs(samples[:n].mean(0) - diag)
        np.testing.assert_array_less(err, 5 * sd / np.sqrt(n) + 1e-12)
        errors.append(np.sqrt(np.mean(err**2)))
    assert errors[1] < errors[0] / 2.5  # the error shrinks like 1/√n (here by 7×)


def _separable_loss(params, batch):
    """½ Σ h ⊙ w² − c ⊙ w for each leaf: a diagonal Hessian, so z ⊙ Hz = h exactly."""
    del batch
    return sum(jnp.sum(0.5 * h * w**2 - c * w) for w, (h, c) in
               zip(jax.tree.leaves(params), CURV))


RNG = np.random.default_rng(0)
PARAMS0 = {"kernel": RNG.normal(size=(3, 2, 4)), "bias": RNG.normal(size=(4,))}
CURV = [(RNG.uniform(0.5, 3.0, size=p.shape), RNG.normal(size=p.shape))
        for p in jax.tree.leaves(PARAMS0)]


def test_adahessian_step_equals_algorithm_1_written_plainly():
    lr, b1, b2, eps, k, wd, every = 0.1, 0.8, 0.9, 1e-4, 0.5, 0.01, 2
    opt = tx.make("adahessian", learning_rate=lr, b1=b1, b2=b2, eps=eps,
                  hessian_power=k, weight_decay=wd, update_interval=every)
    params = jax.tree.map(jnp.asarray, PARAMS0)
    state = opt.init(params)
    step = jax.jit(functools.partial(tx.train_step, opt, _separable_loss))

    leaves = [np.array(x) for x in jax.tree.leaves(PARAMS0)]
    m = [np.zeros_like(w) for w in leaves]
    v = [np.zeros_like(w) for w in leaves]
    n_h = 0
    for t in range(1, 8):
        params, state, _ = step(params, state, jnp.zeros(1), jax.random.key(t))
        if (t - 1) % every == 0:
            n_h += 1
        for i, (w, (h, c)) in enumerate(zip(leaves, CURV)):
            g = h * w - c
            d = np.abs(h)
            if d.ndim > 2:  # spatial averaging over the kernel's leading (spatial) axis
                d = np.broadcast_to(d.mean(axis=0, keepdims=True), d.shape)
            if (t - 1) % every == 0:
                v[i] = b2 * v[i] + (1 - b2) * d * d
            m[i] = b1 * m[i] + (1 - b1) * g
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**n_h)
            leaves[i] = w - lr * (m_hat / (np.sqrt(v_hat) ** k + eps) + wd * w)
        for got, want in zip(jax.tree.leaves(params), leaves):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_spatial_average_layouts():
    d = RNG.normal(size=(3, 5, 2, 4))
    np.testing.assert_allclose(tx.spatial_average(jnp.asarray(d)),
                               np.broadcast_to(np.abs(d).mean((0, 1), keepdims=True), d.shape))
    m = RNG.normal(size=(5, 4))
    np.testing.assert_allclose(tx.spatial_average(jnp.asarray(m)), np.abs(m))


def test_adahessian_errors():
    params = {"w": jnp.ones(3)}
    opt = tx.adahessian(0.1)
    with pytest.raises(ValueError, match="key"):
        opt.update(params, opt.init(params), params, obj_fn=lambda p: jnp.sum(p["w"]**2))
    with pytest.raises(ValueError, match="update_interval"):
        tx.scale_by_adahessian(update_interval=0)
