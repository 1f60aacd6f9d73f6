"""Error bars: the convergence flag, the probe planner and the density's moment errors,
against closed forms and numpy.linalg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls

KEY = jax.random.key(0)


def symmetric(spectrum, seed=0):
    n = len(spectrum)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = q @ np.diag(spectrum) @ q.T
    return ls.LinearOperator(lambda v, a=jnp.asarray(a): a @ v, jnp.zeros(n)), a


def test_converged_flag_is_the_residual_test_on_true_residuals():
    spectrum = np.concatenate([[10.0, 9.0, 8.5], np.linspace(-1.0, 1.0, 57)])
    op, a = symmetric(spectrum, seed=1)
    for steps, tol in ((6, 1e-2), (60, 1e-8)):
        eig = ls.eigenvalues(op, k=3, key=KEY, num_steps=steps, tol=tol)
        x = np.asarray(eig.vectors)
        true_res = np.linalg.norm(x @ a - np.asarray(eig.values)[:, None] * x, axis=1)
        np.testing.assert_array_equal(eig.converged, true_res <= tol * np.abs(eig.values))
        if steps == 60:  # the whole space: every pair converged to rounding
            assert eig.converged.all()
    few = ls.eigenvalues(op, k=3, key=KEY, num_steps=6, tol=1e-6)
    assert not few.converged.all()  # six steps cannot resolve 10, 9, 8.5 to 1e-6


def test_power_iteration_reports_its_weaker_convergence():
    op, a = symmetric(np.concatenate([[5.0, 4.9], np.linspace(0, 1, 30)]), seed=2)
    eig = ls.eigenvalues(op, k=1, key=KEY, method="power", tol=1e-3, max_iters=50)
    x = np.asarray(eig.vectors[0])
    res = np.linalg.norm(a @ x - float(eig.values[0]) * x)
    assert bool(eig.converged[0]) == (res <= 1e-3 * abs(float(eig.values[0])))


def test_probe_planner_matches_the_hutchinson_variance_closed_form():
    rng = np.random.default_rng(3)
    b = rng.normal(size=(40, 40))
    op, a = symmetric(np.linspace(0.5, 3.0, 40), seed=4)
    a = a + 0.05 * (b + b.T)
    op = ls.LinearOperator(lambda v, a=jnp.asarray(a): a @ v, jnp.zeros(40))
    var = 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))  # Rademacher Hutchinson
    rel = 0.01
    plan = ls.probes_for(op, rel, key=KEY, pilot_probes=3000)
    np.testing.assert_allclose(float(plan.sample_std) ** 2, var, rtol=0.1)
    np.testing.assert_allclose(float(plan.trace), np.trace(a), rtol=0.01)
    ideal = var / (rel * np.trace(a)) ** 2
    assert plan.pilot_probes == 3000 and isinstance(plan.num_probes, int)
    assert 0.8 * ideal < plan.num_probes < 1.25 * ideal, (plan.num_probes, ideal)
    # With the planned count, the estimate lands within rel·|tr| about 68% of the time.
    run = jax.jit(lambda key: ls.trace(op, key=key, num_probes=plan.num_probes,
                                       method="hutchinson").value)
    errs = np.array([float(run(jax.random.key(100 + s))) for s in range(200)])
    within = np.mean(np.abs(errs - np.trace(a)) <= rel * np.trace(a))
    assert 0.55 < within < 0.8, within


def test_probe_planner_with_a_small_pilot_is_in_the_right_range():
    op, a = symmetric(np.linspace(-1.0, 4.0, 30), seed=5)
    var = 2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2))
    ideal = var / (0.05 * np.trace(a)) ** 2
    counts = [ls.probes_for(op, 0.05, key=jax.random.key(s)).num_probes for s in range(20)]
    assert 0.75 * ideal < np.median(counts) < 1.3 * ideal, (np.median(counts), ideal)


def test_probe_planner_rejects_bad_input():
    op, _ = symmetric(np.linspace(1.0, 2.0, 10))
    with pytest.raises(ValueError, match="rel_error"):
        ls.probes_for(op, 0.0, key=KEY)
    with pytest.raises(ValueError, match="pilot_probes"):
        ls.probes_for(op, 0.1, key=KEY, pilot_probes=1)
    zero = ls.LinearOperator(lambda v: 0.0 * v, jnp.zeros(5))
    with pytest.raises(ValueError, match="trace is 0"):
        ls.probes_for(zero, 0.1, key=KEY)
    with pytest.raises(ValueError, match="tol"):
        ls.eigenvalues(op, k=1, key=KEY, tol=0.0)


def test_density_reports_its_budget():
    op, _ = symmetric(np.linspace(-0.5, 1.0, 12), seed=6)
    den = ls.density(op, key=KEY, num_probes=7, num_steps=500, num_points=10)
    # Never more steps than the dimension.
    assert (den.num_probes, den.num_steps) == (7, 12)
    assert den.nodes.shape == den.weights.shape == (7, 12)


@pytest.mark.slow
def test_density_moment_errors_cover_the_truth():
    spectrum = np.concatenate([[3.0, 2.0], np.linspace(-0.5, 1.0, 48)])
    op, a = symmetric(spectrum, seed=6)
    n = len(spectrum)
    hits = {1: [], 2: []}
    for s in range(60):
        d = ls.density(op, key=jax.random.key(s), num_probes=16, num_steps=8,
                       num_points=10)
        for k in hits:
            est, err = d.moments(k)
            true = np.trace(np.linalg.matrix_power(a, k)) / n
            hits[k].append(abs(float(est) - true) <= 2 * float(err))
    # Nominal 95%; measured 97% for the mean and 85% for the second moment, whose
    # per-probe samples are skewed (a large sample comes with a large spread).
    for k, h in hits.items():
        assert 0.78 < np.mean(h) <= 1.0, (k, np.mean(h))
