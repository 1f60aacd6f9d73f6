"""The custom-study helpers: resumable pieces and the plain training loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transforms as tx
from experiments import config as cfglib
from experiments import studies
from experiments.loop import fit


def test_piece_computes_once_and_keeps_other_pieces(tmp_path):
    calls = []
    assert studies.piece(tmp_path, "a", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    assert studies.piece(tmp_path, "b", lambda: [2.5]) == [2.5]
    logged = []
    again = studies.piece(tmp_path, "a", lambda: pytest.fail("recomputed"), logged.append)
    assert again == {"x": 1} and calls == [1] and "skipped" in logged[0]
    assert studies.load_json(tmp_path / studies.RESULTS) == {"a": {"x": 1}, "b": [2.5]}


def _linear_problem(n=12, d=3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n,)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(y)


def test_train_full_batch_is_gradient_descent():
    x, y = _linear_problem()
    loss_fn = lambda p, b: 0.5 * jnp.mean((b[0] @ p - b[1]) ** 2)  # noqa: E731
    lr, steps = 0.1, 7
    out = fit(loss_fn, jnp.zeros(3), tx.make("sgd", learning_rate=lr), (x, y),
              steps=steps, batch_size=len(x), key=jax.random.key(0))
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w, losses = np.zeros(3), []
    for _ in range(steps):
        losses.append(0.5 * np.mean((xn @ w - yn) ** 2))
        w = w - lr * xn.T @ (xn @ w - yn) / len(xn)
    np.testing.assert_allclose(out.params, w, rtol=1e-5)
    np.testing.assert_allclose(out.losses, losses, rtol=1e-5)


def test_train_visits_every_example_once_per_epoch():
    """With a loss linear in the parameters, mean(x_b · w), SGD's gradient is the batch
    mean of x, so after whole epochs w = −η (epochs / B) Σ x exactly when every example
    is used once per epoch."""
    x, _ = _linear_problem(n=12)
    loss_fn = lambda p, b: jnp.mean(b[0] @ p)  # noqa: E731
    lr, batch = 0.5, 4
    out = fit(loss_fn, jnp.zeros(3), tx.make("sgd", learning_rate=lr),
              (x, jnp.zeros(12)), steps=2 * 3, batch_size=batch, key=jax.random.key(3))
    np.testing.assert_allclose(out.params, -lr * 2 / batch * np.asarray(x).sum(0),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        fit(loss_fn, jnp.zeros(3), tx.make("sgd", learning_rate=lr),
            (x, jnp.zeros(12)), steps=1, batch_size=13, key=jax.random.key(0))


def test_array_piece_round_trips(tmp_path):
    tree = {"a": jnp.arange(6.0).reshape(2, 3), "b": [jnp.ones(4), jnp.zeros(())]}
    out = studies.array_piece(tmp_path, "params", lambda: tree, tree)
    again = studies.array_piece(tmp_path, "params", lambda: pytest.fail("recomputed"), tree)
    for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(tree)):
        np.testing.assert_array_equal(x, y)
    assert jax.tree.structure(again) == jax.tree.structure(out)


def test_mnist1d_splits():
    (x, y), (xt, yt) = studies.mnist1d(100, 50)
    assert x.shape == (100, 40) and y.shape == (100,) and xt.shape == (50, 40)
    with pytest.raises(cfglib.ConfigError, match="num_train"):
        studies.mnist1d(10**6, 50)
