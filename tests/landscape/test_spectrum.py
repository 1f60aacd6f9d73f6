"""Eigenvalues, traces, diagonals and densities against numpy.linalg and closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def mlp_hessian():
    params = m.mlp_params(jax.random.key(1), sizes=(6, 12, 12, 4))  # 292 parameters
    batch = m.classification_data(jax.random.key(2), n=64, d=6, classes=4)
    op = ls.hessian(m.ce_loss, params, batch, chunk_size=16)
    dense = np.asarray(m.dense_hessian(m.ce_loss, params, batch))
    assert dense.shape == (292, 292)
    return op, dense


def designed_quadratic(spectrum, seed=0):
    """A quadratic loss ½ xᵀAx whose Hessian has the given eigenvalues in a random basis."""
    n = len(spectrum)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(spectrum) @ q.T)
    params = {"x": jnp.zeros(n // 2), "y": jnp.zeros(n - n // 2)}

    def loss(p, batch):
        z = jnp.concatenate([p["x"], p["y"]])
        return 0.5 * z @ a @ z + 0.0 * batch.sum()

    return ls.hessian(loss, params, jnp.zeros((1, 1))), np.asarray(a)


# A spectrum with negative values, tight clusters, a repeated value and a large gap.
DESIGNED = np.concatenate([[100.0, 99.999, 50.0, 50.0, 50.0], np.linspace(-3, 3, 40),
                           [-20.0, -20.0 + 1e-4, 0.0, 0.0, 0.0, 0.0]])


def test_lanczos_top_and_bottom_match_eigvalsh(mlp_hessian):
    op, dense = mlp_hessian
    ref = np.linalg.eigvalsh(dense)
    top = ls.eigenvalues(op, k=5, key=KEY, which="top", num_steps=120)
    np.testing.assert_allclose(top.values, ref[::-1][:5], rtol=1e-6)
    bottom = ls.eigenvalues(op, k=3, key=KEY, which="bottom", num_steps=120)
    np.testing.assert_allclose(bottom.values, ref[:3], rtol=1e-6)


def test_reported_residuals_are_the_true_residuals(mlp_hessian):
    op, dense = mlp_hessian
    eig = ls.eigenvalues(op, k=4, key=KEY, which="both", num_steps=60)
    vecs = jax.vmap(lambda t: ravel_pytree(t)[0])(eig.vectors)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-10)
    true_res = np.linalg.norm(vecs @ dense - eig.values[:, None] * vecs, axis=1)
    np.testing.assert_allclose(eig.residuals, true_res, rtol=1e-6, atol=1e-12)
    assert np.all(np.diff(eig.values) <= 0)  # "both": descending


def test_designed_spectrum_with_clusters_and_breakdown():
    op, a = designed_quadratic(DESIGNED)
    ref = np.sort(DESIGNED)
    # Full dimension: the Krylov space closes early (repeated eigenvalues), so Lanczos
    # must restart rather than fill its tridiagonal matrix with noise.
    eig = ls.eigenvalues(op, k=5, key=KEY, which="both", num_steps=len(DESIGNED))
    np.testing.assert_allclose(eig.values[:5], ref[::-1][:5], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(eig.values[5:], ref[:5][::-1], rtol=1e-6, atol=1e-9)
    assert np.all(eig.residuals < 1e-6)


def test_lanczos_on_a_low_rank_operator():
    # Rank 3 in 50 dimensions: the Krylov space has dimension 4 (0 is an eigenvalue).
    u = np.linalg.qr(np.random.default_rng(1).normal(size=(50, 3)))[0]
    a = jnp.asarray(u @ np.diag([5.0, 2.0, 1.0]) @ u.T)
    op = ls.LinearOperator(lambda v: a @ v, jnp.zeros(50))
    eig = ls.eigenvalues(op, k=4, key=KEY, num_steps=30)
    np.testing.assert_allclose(eig.values, [5.0, 2.0, 1.0, 0.0], atol=1e-10)
    den = ls.density(op, key=KEY, num_probes=4, num_steps=30)
    assert np.all(np.isfinite(den.weights))
    np.testing.assert_allclose(den.weights.sum(1), 1.0, atol=1e-10)


def test_power_iteration_agrees_with_lanczos(mlp_hessian):
    op, dense = mlp_hessian
    ref = np.linalg.eigvalsh(dense)[::-1]
    power = ls.eigenvalues(op, k=2, key=KEY, method="power", tol=1e-12, max_iters=2000)
    np.testing.assert_allclose(power.values, ref[:2], rtol=1e-5)


@pytest.mark.slow
def test_eigenvalues_are_the_same_under_jit(mlp_hessian):
    op, _ = mlp_hessian
    eager = ls.eigenvalues(op, k=3, key=KEY)
    jitted = jax.jit(lambda op, key: ls.eigenvalues(op, k=3, key=key))(op, KEY)
    np.testing.assert_allclose(jitted.values, eager.values, rtol=1e-12)
    again = ls.eigenvalues(op, k=3, key=KEY)
    np.testing.assert_array_equal(again.values, eager.values)  # deterministic per key


def test_hutchinson_and_hutch_plus_plus_fall_within_their_error():
    # Over many seeds, the reported standard error covers the true trace at about the
    # normal rate, and Hutch++ is much tighter than Hutchinson on a decaying spectrum.
    spectrum = np.concatenate([10.0 / np.arange(1, 21) ** 2, np.linspace(-0.1, 0.2, 40)])
    op, a = designed_quadratic(spectrum, seed=3)
    true = np.trace(a)
    run = jax.jit(lambda key, method: ls.trace(op, key=key, num_probes=30, method=method),
                  static_argnums=1)
    for method in ("hutchinson", "hutch++"):
        z = []
        for s in range(200):
            est = run(jax.random.key(s), method)
            z.append((float(est.value) - true) / float(est.std_error))
        z = np.abs(np.array(z))
        assert 0.85 < np.mean(z < 2.0) <= 1.0, (method, np.mean(z < 2.0))
    hutch = ls.trace(op, key=KEY, num_probes=30, method="hutchinson")
    hpp = ls.trace(op, key=KEY, num_probes=30, method="hutch++")
    assert hpp.std_error < hutch.std_error / 3
    exact_rank = ls.trace(ls.LinearOperator(lambda v: jnp.asarray(a[:, :2] @ a[:2]) @ v,
                                            jnp.zeros(60)), key=KEY, num_probes=9)
    np.testing.assert_allclose(exact_rank.value, np.trace(a[:, :2] @ a[:2]), rtol=1e-8)


def test_trace_of_the_mlp_hessian(mlp_hessian):
    op, dense = mlp_hessian
    est = ls.trace(op, key=KEY, num_probes=150)
    assert abs(float(est.value) - np.trace(dense)) < 4 * float(est.std_error)


def test_diagonal_estimate_converges_to_the_true_diagonal(mlp_hessian):
    op, dense = mlp_hessian
    est = ls.diagonal(op, key=KEY, num_probes=400)
    got = ravel_pytree(est.value)[0]
    err = ravel_pytree(est.std_error)[0]
    z = np.abs(got - np.diag(dense)) / err
    assert np.mean(z < 2.0) > 0.85


def test_slq_moments_match_traces_of_powers(mlp_hessian):
    op, dense = mlp_hessian
    den = ls.density(op, key=KEY, num_probes=20, num_steps=40)
    n = dense.shape[0]
    assert den.nodes.shape == (20, 40) and den.num_probes == 20
    for k in range(4):
        true = np.trace(np.linalg.matrix_power(dense, k)) / n
        est, err = den.moments(k)
        if k == 0:
            np.testing.assert_allclose(est, 1.0, rtol=1e-10)
        else:
            assert abs(float(est) - true) < 4 * float(err), (k, est, true, err)
    # The smoothed density integrates to one.
    np.testing.assert_allclose(np.trapezoid(den.values, den.grid), 1.0, rtol=1e-3)


def test_slq_moments_are_exact_for_a_single_known_probe():
    # With one probe and enough steps, Σ w θᵏ equals vᵀAᵏv / ‖v‖² for k < 2m.
    op, a = designed_quadratic(DESIGNED[:20], seed=5)
    den = ls.density(op, key=KEY, num_probes=1, num_steps=8)
    # The probe `density` draws: its first probe key, split over the two leaves x, y.
    k_probe = jax.random.split(jax.random.split(KEY)[0], 1)[0]
    v = np.concatenate([np.asarray(jax.random.rademacher(k, (10,), jnp.float64))
                        for k in jax.random.split(k_probe, 2)])
    for k in range(6):
        ref = v @ np.linalg.matrix_power(a, k) @ v / (v @ v)
        np.testing.assert_allclose(den.moments(k)[0], ref, rtol=1e-8, atol=1e-8)


# ------------------------------------------------------------------ bad input ---

def test_bad_spectrum_arguments(mlp_hessian):
    op, _ = mlp_hessian
    with pytest.raises(ValueError, match="dimension"):
        ls.eigenvalues(op, k=400, key=KEY)
    with pytest.raises(ValueError, match="which"):
        ls.eigenvalues(op, k=1, key=KEY, which="middle")
    with pytest.raises(ValueError, match="num_steps"):
        ls.eigenvalues(op, k=10, key=KEY, num_steps=5)
    with pytest.raises(ValueError, match="power"):
        ls.eigenvalues(op, k=1, key=KEY, method="power", which="bottom")
    with pytest.raises(ValueError, match="num_probes"):
        ls.trace(op, key=KEY, num_probes=2)
    with pytest.raises(ValueError, match="sigma"):
        ls.density(op, key=KEY, sigma=0.0)


def test_nan_in_the_loss_is_reported():
    params = {"w": jnp.ones(3)}
    op = ls.hessian(lambda p, b: jnp.sum(jnp.log(p["w"] - 2.0) * b.mean()), params,
                    jnp.ones((4, 1)))
    for call in (lambda: ls.eigenvalues(op, k=1, key=KEY),
                 lambda: ls.trace(op, key=KEY, num_probes=6),
                 lambda: ls.density(op, key=KEY, num_steps=3)):
        with pytest.raises(ValueError, match="non-finite"):  # loss NaN, Hessian finite
            call()
