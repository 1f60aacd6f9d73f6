"""`experiments.loop.fit` against loops written here: mini-batch SGD in exact epochs,
full-batch gradient descent, the scanned run equal to the Python loop, records, a
vmapped learning-rate sweep, SAM's extra arguments, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import transforms as tx
from experiments.loop import fit, scanned

N, D = 20, 3


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(N,)), jnp.float32)
    return x, y


def loss_fn(w, batch):
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def _plain_sgd(x, y, lr, steps, batch, key):
    k_data, k_step = jax.random.split(key)
    per_epoch, w, losses = N // batch, np.zeros(D), []
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    for t in range(steps):
        if t % per_epoch == 0:
            perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, t // per_epoch),
                                                     N))
        idx = perm[(t % per_epoch) * batch:(t % per_epoch + 1) * batch]
        r = xn[idx] @ w - yn[idx]
        losses.append(0.5 * np.mean(r ** 2))
        w = w - lr * xn[idx].T @ r / batch
    return w, np.array(losses)


@pytest.mark.parametrize("scan", [False, True])
def test_minibatch_sgd_in_exact_epochs(problem, scan):
    x, y = problem
    key = jax.random.key(5)
    # 20 examples in batches of 6: 3 per epoch, the last 2 examples dropped each epoch.
    out = fit(loss_fn, jnp.zeros(D), optax.sgd(0.1), (x, y), steps=8, batch_size=6,
              key=key, scan=scan)
    w, losses = _plain_sgd(x, y, 0.1, 8, 6, key)
    np.testing.assert_allclose(out.params, w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.losses, losses, rtol=1e-5)


def test_full_batch_is_gradient_descent_and_records_every_n_steps(problem):
    x, y = problem
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    record = lambda w: (loss_fn(w, (x, y)), w[0])  # noqa: E731
    got = [fit(loss_fn, jnp.zeros(D), optax.sgd(0.2), (x, y), steps=9, key=jax.random.key(0),
               record=record, record_every=3, scan=scan) for scan in (False, True)]
    w, ws = np.zeros(D), [np.zeros(D)]
    for _ in range(9):
        w = w - 0.2 * xn.T @ (xn @ w - yn) / N
        ws.append(w)
    for out in got:
        np.testing.assert_allclose(out.params, w, rtol=1e-5)
        # Records at steps 0, 3, 6, 9.
        np.testing.assert_allclose(out.records[1], [ws[t][0] for t in (0, 3, 6, 9)],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(out.records[0], [
            0.5 * np.mean((xn @ ws[t] - yn) ** 2) for t in (0, 3, 6, 9)], rtol=1e-5)
    # 10 steps with records every 3: the last record is at step 9, one more step follows.
    out = fit(loss_fn, jnp.zeros(D), optax.sgd(0.2), (x, y), steps=10,
              key=jax.random.key(0), record=record, record_every=3, scan=True)
    assert out.records[0].shape == (4,) and out.losses.shape == (10,)


def test_scanned_fit_vmaps_over_learning_rates(problem):
    x, y = problem
    lrs = jnp.asarray([0.05, 0.2])
    swept = jax.vmap(lambda lr: fit(loss_fn, jnp.zeros(D), optax.sgd(lr), (x, y), steps=5,
                                    batch_size=4, key=jax.random.key(1), scan=True).params)(lrs)
    for i, lr in enumerate([0.05, 0.2]):
        w, _ = _plain_sgd(x, y, lr, 5, 4, jax.random.key(1))
        np.testing.assert_allclose(swept[i], w, rtol=1e-5, atol=1e-7)


def test_sam_gets_its_gradient_function_through_train_step(problem):
    x, y = problem
    opt = tx.make("sam", learning_rate=0.1, rho=0.05)
    out = fit(loss_fn, jnp.ones(D), opt, (x, y), steps=3, key=jax.random.key(0))
    w = np.ones(D)
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    grad = lambda w: xn.T @ (xn @ w - yn) / N  # noqa: E731
    for _ in range(3):   # SAM: the gradient at w + ρ g/‖g‖
        g = grad(w)
        w = w - 0.1 * grad(w + 0.05 * g / np.linalg.norm(g))
    np.testing.assert_allclose(out.params, w, rtol=1e-4)


def test_the_scanned_program_can_be_compiled_alone(problem):
    x, y = problem
    opt = optax.sgd(0.1)
    run = scanned(loss_fn, opt, (x, y), steps=4, batch_size=5)
    compiled = run.lower(jnp.zeros(D), opt.init(jnp.zeros(D)), (x, y),
                         jax.random.key(0)).compile()
    out = compiled(jnp.zeros(D), opt.init(jnp.zeros(D)), (x, y), jax.random.key(0))
    np.testing.assert_allclose(out.params, fit(loss_fn, jnp.zeros(D), opt, (x, y), steps=4,
                                               batch_size=5, key=jax.random.key(0)).params,
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs, word", [
    (dict(batch_size=N + 1), "batch_size"), (dict(batch_size=0), "batch_size"),
    (dict(steps=-1), "steps"), (dict(steps=2.0), "steps"),
    (dict(record=lambda w: w), "record_every"),
])
def test_bad_arguments_name_themselves(problem, kwargs, word):
    x, y = problem
    with pytest.raises(ValueError, match=word):
        fit(loss_fn, jnp.zeros(D), optax.sgd(0.1), (x, y), **{"steps": 2,
                                                               "key": jax.random.key(0),
                                                               **kwargs})
    with pytest.raises(ValueError, match="same number of examples"):
        fit(loss_fn, jnp.zeros(D), optax.sgd(0.1), (x, y[:-1]), steps=1,
            key=jax.random.key(0))
