"""The critical-point finder against a designed function with a known saddle and minima,
and against plain numpy gradient descent on ½‖∇f‖²."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls

BATCH = jnp.zeros((4, 1))


def saddle_fn(p, batch):
    # ½x² − ½y² + ¼y⁴ + z²: a strict saddle at 0 (Hessian diag(1, −1, 2), index 1/3)
    # and minima at (0, ±1, 0) (Hessian diag(1, 2, 2)).
    x, y, z = p
    return 0.5 * x ** 2 - 0.5 * y ** 2 + 0.25 * y ** 4 + z ** 2 + 0.0 * jnp.sum(batch)


def grad_np(p):
    x, y, z = p
    return np.array([x, -y + y ** 3, 2 * z])


def hess_np(p):
    return np.diag([1.0, -1.0 + 3 * p[1] ** 2, 2.0])


def test_lands_on_the_saddle_from_nearby_starts_and_reports_its_index():
    starts = jax.random.uniform(jax.random.key(0), (6, 3), minval=-0.3, maxval=0.3)
    cp = ls.critical_points(saddle_fn, starts, BATCH, steps=50, tol=1e-10, index="dense",
                            index_tol=1e-6)
    assert np.all(np.asarray(cp.converged))
    np.testing.assert_allclose(np.asarray(cp.params), 0.0, atol=1e-9)
    true_index = np.mean(np.linalg.eigvalsh(hess_np(np.zeros(3))) < 0)  # 1/3
    np.testing.assert_array_equal(np.asarray(cp.index.negative), true_index)
    np.testing.assert_allclose(np.asarray(cp.loss), 0.0, atol=1e-18)
    assert np.all(np.asarray(cp.grad_norm) <= 1e-10)


def test_lands_on_a_minimum_with_index_zero():
    cp = ls.find_critical_point(saddle_fn, jnp.array([0.2, 0.8, -0.1]), BATCH, steps=50,
                                tol=1e-10, index="dense")
    assert bool(cp.converged)
    np.testing.assert_allclose(np.asarray(cp.params), [0.0, 1.0, 0.0], atol=1e-9)
    assert float(cp.loss) == pytest.approx(-0.25, abs=1e-12)
    assert float(cp.index.negative) == np.mean(np.linalg.eigvalsh(hess_np([0, 1, 0])) < 0)


def test_gd_on_half_squared_gradient_matches_plain_numpy():
    p0 = np.array([0.3, 0.2, -0.1])
    eta, steps = 0.2, 25
    p = p0.copy()
    for _ in range(steps):
        p = p - eta * hess_np(p) @ grad_np(p)   # ∇ ½‖g‖² = H g
    cp = ls.find_critical_point(saddle_fn, jnp.asarray(p0), BATCH, method="gd",
                                learning_rate=eta, steps=steps, tol=1e-300, index="none")
    np.testing.assert_allclose(np.asarray(cp.params), p, rtol=1e-12, atol=1e-14)
    assert int(cp.steps) == steps and not bool(cp.converged)
    assert float(cp.grad_norm) == pytest.approx(np.linalg.norm(grad_np(p)), rel=1e-10)
    assert cp.index is None


def test_adam_also_reaches_the_saddle():
    cp = ls.find_critical_point(saddle_fn, jnp.array([0.1, 0.05, 0.1]), BATCH,
                                method="adam", learning_rate=0.01, steps=3000, tol=1e-5,
                                index="dense", index_tol=1e-3)
    assert bool(cp.converged)
    np.testing.assert_allclose(np.asarray(cp.params), 0.0, atol=1e-4)
    assert float(cp.index.negative) == pytest.approx(1 / 3)


def test_a_start_that_cannot_converge_is_flagged():
    # x + ½y² has no critical point: ‖∇f‖ >= 1 everywhere.
    no_critical = lambda p, b: p[0] + 0.5 * p[1] ** 2 + 0.0 * jnp.sum(b)
    cp = ls.critical_points(no_critical, jnp.ones((2, 2)), BATCH, steps=30, tol=1e-6,
                            index="none")
    assert not np.any(np.asarray(cp.converged))
    assert np.all(np.asarray(cp.grad_norm) >= 1.0)
    # A far start with too small a budget: reported as not converged, steps used up.
    cp = ls.find_critical_point(saddle_fn, jnp.array([3.0, 3.0, 3.0]), BATCH, steps=2,
                                tol=1e-10, index="dense")
    assert not bool(cp.converged) and int(cp.steps) == 2
    assert float(cp.grad_norm) == pytest.approx(np.linalg.norm(grad_np(np.asarray(cp.params))))


@pytest.mark.slow
def test_density_index_at_the_critical_point_of_a_designed_quadratic():
    n = 20
    eigs = np.concatenate([-np.linspace(0.5, 2, 5), np.linspace(0.5, 3, 15)])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    a = jnp.asarray(q @ np.diag(eigs) @ q.T)
    quad = lambda p, b: 0.5 * p @ a @ p + 0.0 * jnp.sum(b)
    starts = jax.random.normal(jax.random.key(1), (2, n))
    cp = ls.critical_points(quad, starts, BATCH, steps=20, cg_steps=n, tol=1e-8,
                            index="density", key=jax.random.key(2), num_probes=10,
                            num_lanczos=20, index_tol=0.1, batch_size=2)
    assert np.all(np.asarray(cp.converged))
    np.testing.assert_allclose(np.asarray(cp.params), 0.0, atol=1e-7)
    err = np.asarray(cp.index.negative_std_error)
    assert np.all(np.abs(np.asarray(cp.index.negative) - 0.25) <= 4 * err + 1e-6)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="method"):
        ls.critical_points(saddle_fn, jnp.zeros((2, 3)), BATCH, method="newton")
    with pytest.raises(ValueError, match="steps"):
        ls.critical_points(saddle_fn, jnp.zeros((2, 3)), BATCH, steps=0)
    with pytest.raises(ValueError, match="tol"):
        ls.critical_points(saddle_fn, jnp.zeros((2, 3)), BATCH, tol=-1.0)
    with pytest.raises(ValueError, match="key"):
        ls.critical_points(saddle_fn, jnp.zeros((2, 3)), BATCH, index="density")
    with pytest.raises(ValueError, match="starts"):
        ls.critical_points(saddle_fn, {"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 1))},
                           BATCH)
    with pytest.raises(ValueError, match="starts"):
        ls.critical_points(saddle_fn, jnp.zeros((2, 3), jnp.int32), BATCH)
    with pytest.raises(ValueError, match="index"):
        ls.find_critical_point(saddle_fn, jnp.zeros(3), BATCH, index="exact")
    with pytest.raises(ValueError, match="loss_fn"):
        ls.find_critical_point("loss", jnp.zeros(3), BATCH)


@pytest.mark.parametrize("index", ["dense", "density"])
def test_a_diverged_search_reports_nan_index_not_a_minimum(index):
    # GD on ½‖g‖² with g = (x, −y + y³, 2z): far from the origin the y³ term makes every
    # step overshoot, the iterate grows without bound and becomes non-finite within a
    # few steps. A NaN point has no index; 0 would read like a minimum.
    cp = ls.find_critical_point(saddle_fn, jnp.array([3.0, 3.0, 3.0]), BATCH, method="gd",
                                learning_rate=0.5, steps=20, tol=1e-8, index=index,
                                key=jax.random.key(0))
    assert not np.all(np.isfinite(np.asarray(cp.params)))
    assert not bool(cp.converged)
    for field in cp.index:
        assert np.isnan(float(field)), cp.index
    # A finite point in the same batch of starts keeps its index.
    starts = jnp.array([[3.0, 3.0, 3.0], [0.01, 0.99, 0.0]])
    cp = ls.critical_points(saddle_fn, starts, BATCH, method="gd", learning_rate=0.5,
                            steps=20, tol=1e-8, index="dense")
    assert np.isnan(float(cp.index.negative[0]))
    assert float(cp.index.negative[1]) == 0.0
