"""The Hessian index and per-layer gradient norms against explicit references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls


def _designed(n=60, seed=0):
    # A fifth negative, 30% exactly zero, the rest positive; random orthogonal basis.
    eigs = np.concatenate([-np.linspace(0.5, 3.0, n // 5), np.zeros(n * 3 // 10),
                           np.linspace(0.2, 5, n - n // 5 - n * 3 // 10)])
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(eigs) @ q.T)
    return ls.LinearOperator(lambda v: a @ v, jnp.zeros(n)), eigs


def test_index_of_a_designed_quadratic_dense_is_exact():
    op, eigs = _designed()
    idx = ls.hessian_index(op, method="dense", tol=1e-6)
    assert float(idx.negative) == pytest.approx(np.mean(eigs < -1e-6), abs=1e-12)
    assert float(idx.near_zero) == pytest.approx(np.mean(np.abs(eigs) <= 1e-6), abs=1e-12)
    assert float(idx.negative_std_error) == 0.0


def test_index_from_the_density_within_its_standard_error():
    op, eigs = _designed()
    idx = ls.hessian_index(op, key=jax.random.key(1), num_probes=40, num_steps=30, tol=0.05)
    true_neg, true_zero = np.mean(eigs < -0.05), np.mean(np.abs(eigs) <= 0.05)
    assert 0 < float(idx.negative_std_error) < 0.05
    assert abs(float(idx.negative) - true_neg) < 4 * float(idx.negative_std_error)
    assert abs(float(idx.near_zero) - true_zero) < 4 * float(idx.near_zero_std_error)


def test_index_of_a_hessian_at_a_saddle():
    # f(x, y) = x² − y² + z²/2 at the origin: one negative eigenvalue of three.
    loss = lambda p, b: p[0] ** 2 - p[1] ** 2 + 0.5 * p[2] ** 2 + 0.0 * jnp.sum(b)
    idx = ls.hessian_index(ls.hessian(loss, jnp.zeros(3), jnp.zeros((1, 1))), method="dense")
    assert float(idx.negative) == pytest.approx(1 / 3)


def test_index_rejects_bad_arguments():
    op, _ = _designed(8)
    with pytest.raises(ValueError, match="key"):
        ls.hessian_index(op)
    with pytest.raises(ValueError, match="method"):
        ls.hessian_index(op, method="exact")
    with pytest.raises(ValueError, match="tol"):
        ls.hessian_index(op, method="dense", tol=-1.0)


def test_layer_grad_norms_against_explicit_per_layer_gradients():
    key = jax.random.key(0)
    k = jax.random.split(key, 4)
    params = {"layers": {0: {"kernel": jax.random.normal(k[0], (5, 7)), "bias": jnp.ones(7)},
                         1: {"kernel": jax.random.normal(k[1], (7, 7)), "bias": jnp.ones(7)},
                         2: {"kernel": jax.random.normal(k[2], (7, 3)), "bias": jnp.ones(3)}}}
    x = jax.random.normal(k[3], (16, 5))

    def loss(p, batch):
        h = batch
        for i in range(3):
            h = h @ p["layers"][i]["kernel"] + p["layers"][i]["bias"]
            h = jnp.tanh(h) if i < 2 else h
        return jnp.mean(h**2)

    out = ls.layer_grad_norms(loss, params, x)
    assert list(out.norms) == ["layers/0", "layers/1", "layers/2"]
    g = jax.grad(loss)(params, x)
    for i in range(3):
        want = np.sqrt(np.sum(np.asarray(g["layers"][i]["kernel"]) ** 2) +
                       np.sum(np.asarray(g["layers"][i]["bias"]) ** 2))
        assert float(out.norms[f"layers/{i}"]) == pytest.approx(want, rel=1e-10)
    assert float(out.ratio) == pytest.approx(float(out.norms["layers/0"] /
                                                   out.norms["layers/2"]), rel=1e-12)
    # A custom grouping: kernels and biases apart, and works under jit.
    by_kind = jax.jit(lambda p: ls.layer_grad_norms(
        loss, p, x, layer_of=lambda path: path.rsplit("/", 1)[-1]).norms)(params)
    assert set(by_kind) == {"kernel", "bias"}
