"""The ravine study: its problems against closed forms, and the ordering facts that hold
robustly on the ill-conditioned quadratic."""

import json

import jax
import numpy as np
import pytest

import experiments
from experiments import config as cfglib
from experiments import studies
from experiments.studies import ravine


@pytest.fixture(scope="module")
def cfg():
    return experiments.load("ravine")


def _quadratic(cfg, name="sgd"):
    return ravine.problem(cfg, "quadratic", ravine.copies(name))


def test_the_regression_is_the_quadratic(cfg):
    q = cfg["quadratic"]
    x, y = (np.asarray(a, np.float64) for a in ravine.regression_data(
        q["eigenvalues"], 30.0, [0.3, -0.2], 32))
    a = ravine.quadratic_matrix(q["eigenvalues"], 30.0)
    np.testing.assert_allclose(x.T @ x / len(x), a, atol=1e-6)
    np.testing.assert_allclose(np.linalg.eigvalsh(a), sorted(q["eigenvalues"]), rtol=1e-12)
    w_star = np.array([0.3, -0.2])
    for w in (np.array([1.0, 2.0]), np.array([-0.5, 0.1])):
        want = 0.5 * (w - w_star) @ a @ (w - w_star)
        for columns in (1, 2):
            got = ravine.regression_loss(ravine.as_params(w, columns), (x, y))
            np.testing.assert_allclose(got, want, rtol=1e-5)


def test_rosenbrock_closed_form():
    f = ravine.rosenbrock_loss(100.0)
    for u, v in ((-1.2, 1.0), (0.5, 0.3)):
        want = (1 - u) ** 2 + 100 * (v - u * u) ** 2
        np.testing.assert_allclose(f(ravine.as_params([u, v]), None), want, rtol=1e-6)
    g = jax.grad(f)(ravine.as_params([1.0, 1.0]), None)["w"]
    np.testing.assert_allclose(g, 0.0, atol=1e-6)


def test_gradient_descent_steps_match_the_closed_form(cfg):
    """GD on ½ eᵀAe with step η: in A's eigenbasis each coordinate shrinks by
    (1 − ηλ_i) per step, so the loss after t steps is Σ ½ λ_i c_i² (1 − ηλ_i)^(2t)."""
    loss_fn, batch, apply_fn, start = _quadratic(cfg)
    q = cfg["quadratic"]
    eta, steps, tol = 1.0, 900, q["tolerance"]
    _, losses = ravine.trajectories("sgd", [eta], {}, loss_fn, batch, start, steps)
    lam, vecs = np.linalg.eigh(ravine.quadratic_matrix(q["eigenvalues"], q["angle"]))
    c = vecs.T @ (np.asarray(q["start"]) - np.asarray(q["minimum"]))
    t = np.arange(steps + 1)[:, None]
    closed = (0.5 * lam * c ** 2 * (1 - eta * lam) ** (2 * t)).sum(axis=1)
    np.testing.assert_allclose(np.asarray(losses[0]), closed, rtol=2e-3, atol=1e-9)
    got = int(ravine.steps_to(losses, tol)[0])
    want = int(np.argmax(closed < tol))
    assert abs(got - want) <= 1, (got, want)


def test_momentum_kfac_beat_gradient_descent_at_the_same_step(cfg):
    """At the stable step η = 1/λ_max, heavy-ball momentum needs fewer steps than GD, and
    K-FAC (here a damped Newton step) fewer still."""
    loss_fn, batch, apply_fn, start = _quadratic(cfg)
    tol, steps = cfg["quadratic"]["tolerance"], 900
    counts = {}
    for name in ("sgd", "momentum", "kfac"):
        _, losses = ravine.trajectories(name, [1.0], cfg["hyper"][name], loss_fn, batch,
                                        start, steps, apply_fn)
        counts[name] = int(ravine.steps_to(losses, tol)[0])
        assert float(losses[0, -1]) < tol, name
    assert 0 < counts["kfac"] < counts["momentum"] < counts["sgd"], counts


def test_adam_and_lion_move_learning_rate_per_coordinate(cfg):
    """Adam's first step is −η g/(|g| + ε) ≈ −η sign(g) (bias correction makes m̂ = g and
    v̂ = g² exactly); Lion (no weight decay) moves exactly η per coordinate every step."""
    loss_fn, batch, apply_fn, start = _quadratic(cfg)
    eta = 0.05
    g0 = np.asarray(jax.grad(loss_fn)(start, batch)["w"][:, 0])
    pts, _ = ravine.trajectories("adam", [eta], cfg["hyper"]["adam"], loss_fn, batch,
                                 start, 3)
    step = np.diff(np.asarray(pts[0]), axis=0)
    np.testing.assert_allclose(step[0], -eta * g0 / (np.abs(g0) + 1e-8), rtol=1e-5)
    pts, _ = ravine.trajectories("lion", [eta], cfg["hyper"]["lion"], loss_fn, batch,
                                 start, 20)
    np.testing.assert_allclose(np.abs(np.diff(np.asarray(pts[0]), axis=0)), eta, rtol=1e-4)


def test_shampoo_is_a_full_matrix_method_on_two_equal_columns(cfg):
    loss_fn, batch, apply_fn, start = _quadratic(cfg, "shampoo")
    assert start["w"].shape == (2, 2)
    hyper = cfg["hyper"]["shampoo"]

    opt = ravine.make_optimizer("shampoo", 0.1, hyper)

    @jax.jit
    def run(params):
        def step(carry, key):
            params, state, _ = ravine.tx.train_step(opt, loss_fn, *carry, batch, key)
            return (params, state), None

        (params, _), _ = jax.lax.scan(step, (params, opt.init(params)),
                                      jax.random.split(jax.random.key(0), 30))
        return params["w"]

    w = np.asarray(run(start))
    np.testing.assert_allclose(w[:, 0], w[:, 1], atol=1e-6)
    adam, _ = ravine.trajectories("adam", [0.1], {}, loss_fn, batch,
                                  ravine.as_params(cfg["quadratic"]["start"]), 30)
    assert np.abs(w[:, 0] - np.asarray(adam[0, -1])).max() > 1e-3


def test_steps_to_counts_staying_below():
    losses = np.array([[5, 0.5, 0.05, 0.01], [5, 0.01, 1.0, 0.01], [5, 0.01, 0.01, 2],
                       [0.0, 0.0, 0.0, 0.0], [5, np.nan, 0.01, 0.01]])
    np.testing.assert_array_equal(ravine.steps_to(losses, 0.1), [2, 3, -1, 0, 2])


def test_bad_config_is_one_line_error():
    with pytest.raises(cfglib.ConfigError, match="optimizers must be"):
        experiments.load("ravine", ["optimizers=['sgd', 'nope']"])
    with pytest.raises(cfglib.ConfigError, match="quadratic.learning_rates.adam"):
        experiments.load("ravine", ["quadratic.learning_rates.adam=[1.0, 0.1]"])
    with pytest.raises(cfglib.ConfigError, match="hyper.momentum"):
        experiments.load("ravine", ["hyper.momentum.momentum=1.5"])


@pytest.mark.slow
def test_study_runs_resumes_and_reports(tmp_path, monkeypatch):
    import experiments

    overrides = ["num_learning_rates=4", "rosenbrock.steps=300"]
    res = experiments.run("ravine", overrides=overrides, out=tmp_path)
    done = res.summary()
    assert set(done) == {f"quadratic/{n}" for n in ravine.OPTIMIZERS} | {
        f"rosenbrock/{n}" for n in ravine.OPTIMIZERS if n != "kfac"}
    for name in ("sgd", "momentum", "adam", "shampoo", "kfac"):
        assert done[f"quadratic/{name}"]["final_loss"] < 1e-6, name
    # Resuming computes nothing: every piece is already stored.
    monkeypatch.setattr(ravine, "run_one", lambda *a: pytest.fail("recomputed"))
    experiments.run(resume=tmp_path)
    lines = ravine.report(tmp_path)
    assert (tmp_path / "ravine.png").is_file()
    assert sum(line.startswith("| ") for line in lines) == 1 + len(ravine.OPTIMIZERS)
    assert json.loads((tmp_path / studies.RESULTS).read_text()) == done
