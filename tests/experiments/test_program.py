"""The group program against plain optax loops written here: every member of a
2-learning-rate x 2-seed group (with a vmapped L2 penalty and a test set), stopping from
the host after a window, divergence, and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiments.config as cfglib
import landscape as ls
import transforms as tx
from experiments import measures
from experiments.data import mnist1d
from experiments.program import (
    CONVERGED,
    DIVERGED,
    RUNNING,
    Settings,
    loss_function,
    make_group_program,
)
from experiments.train import build_model

N, BATCH, STEPS, EVERY = 96, 16, 25, 10   # 6 batches per epoch: 4 epochs, the last cut
LRS, SEEDS, L2 = [0.01, 0.03, 0.01, 0.03], [0, 0, 1, 1], [0.0, 0.02, 0.02, 0.0]


@pytest.fixture(scope="module")
def problem():
    data = mnist1d()
    x, y = jnp.asarray(data.x_train[:N]), jnp.asarray(data.y_train[:N])
    test = (jnp.asarray(data.x_test[:40]), jnp.asarray(data.y_test[:40]))
    model = build_model({"name": "mlp", "hidden": [8], "activation": "relu"}, 40, 10)
    return model, x, y, test


def _adam(hyper):
    return optax.adam(hyper["learning_rate"])


@pytest.fixture(scope="module")
def group(problem):
    model, x, y, test = problem
    calls = []

    def on_window(done, running):
        calls.append((done, running))
        return False

    program = make_group_program(model, _adam, Settings(STEPS, BATCH, EVERY), x, y,
                                 test=test, on_window=on_window)
    out = program({"learning_rate": jnp.asarray(LRS, jnp.float32)},
                  jnp.asarray(SEEDS, jnp.int32), jnp.asarray(L2, jnp.float32))
    return jax.device_get(out), calls


def _plain_loop(model, x, y, lr, seed, l2):
    """The member written out: init from k_init, epoch permutations from k_data."""
    loss_fn = loss_function(model.apply_fn, "cross_entropy")
    k_init, k_data, _ = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k_init)
    opt = optax.adam(lr)
    state = opt.init(params)
    per_epoch, losses = N // BATCH, []

    def objective(p, batch):
        return loss_fn(p, batch) + 0.5 * l2 * sum(jnp.sum(a * a) for a in jax.tree.leaves(p))

    for t in range(STEPS):
        if t % per_epoch == 0:
            perm = jax.random.permutation(jax.random.fold_in(k_data, t // per_epoch), N)
        idx = perm[(t % per_epoch) * BATCH:(t % per_epoch + 1) * BATCH]
        batch = (x[idx], y[idx])
        losses.append(float(loss_fn(params, batch)))
        updates, state = opt.update(jax.grad(objective)(params, batch), state)
        params = optax.apply_updates(params, updates)
    return params, np.array(losses)


@pytest.mark.parametrize("member", range(4))
def test_each_member_equals_a_plain_optax_loop(problem, group, member):
    model, x, y, test = problem
    out, _ = group
    params, losses = _plain_loop(model, x, y, LRS[member], SEEDS[member], L2[member])
    got = jax.tree.map(lambda a: a[member], out.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    assert out.status[member] == RUNNING and out.steps[member] == STEPS
    # Window means of the data loss (the penalty is not in them); the last window has 5.
    windows = [losses[i:i + EVERY].mean() for i in range(0, STEPS, EVERY)]
    np.testing.assert_allclose(out.curve[member], windows, rtol=1e-4)
    loss_fn = loss_function(model.apply_fn, "cross_entropy")
    np.testing.assert_allclose(out.test_loss[member, -1], loss_fn(params, test), rtol=1e-4)
    np.testing.assert_allclose(out.test_accuracy[member, -1],
                               ls.accuracy(model.apply_fn(params, test[0]), test[1]),
                               atol=1e-6)


def test_the_host_hears_every_window_with_the_members_running(group):
    _, calls = group
    assert calls == [(1, 4), (2, 4), (3, 4)]


def test_the_host_can_stop_the_group_after_a_window(problem):
    model, x, y, _ = problem
    program = make_group_program(model, _adam, Settings(STEPS, BATCH, EVERY), x, y,
                                 on_window=lambda done, running: True)
    out = program({"learning_rate": jnp.asarray(LRS[:2], jnp.float32)},
                  jnp.asarray(SEEDS[:2], jnp.int32))
    np.testing.assert_array_equal(out.steps, [EVERY, EVERY])
    assert np.all(np.isfinite(out.curve[:, 0])) and np.all(np.isnan(out.curve[:, 1:]))
    np.testing.assert_array_equal(out.status, [RUNNING, RUNNING])


def test_divergence_and_convergence_freeze_a_member(problem):
    model, x, y, _ = problem
    settings = Settings(STEPS, BATCH, EVERY, until_train_loss=2.2, diverge_above=50.0)
    program = make_group_program(model, lambda h: optax.sgd(h["learning_rate"]), settings,
                                 x, y)
    out = program({"learning_rate": jnp.asarray([1e4, 0.5], jnp.float32)},
                  jnp.asarray([0, 0], jnp.int32))
    assert out.status[0] == DIVERGED and out.steps[0] < EVERY
    assert all(np.all(np.isfinite(a[0])) for a in jax.tree.leaves(out.params))
    # lr 0.5 brings the mean window loss below 2.2 within the budget, then stops.
    assert out.status[1] == CONVERGED
    first = int(np.argmax(out.curve[1] < 2.2))
    assert out.steps[1] == (first + 1) * EVERY and np.all(np.isnan(out.curve[1, first + 1:]))


@pytest.mark.parametrize("kwargs, word", [
    (dict(steps=0), "steps"), (dict(batch_size=2.0), "batch_size"),
    (dict(record_every=True), "record_every"), (dict(loss="hinge"), "loss"),
])
def test_bad_settings_name_the_argument(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Settings(**{**dict(steps=10, batch_size=4, record_every=5), **kwargs})


def test_a_batch_larger_than_the_data_is_refused(problem):
    model, x, y, _ = problem
    with pytest.raises(ValueError, match="batch_size"):
        make_group_program(model, _adam, Settings(10, N + 1, 5), x, y)


def test_the_measure_table_is_the_one_list_of_names():
    assert set(measures.FINAL) == set(cfglib.MEASURES)
    assert set(measures.RECORDED) == set(cfglib.RECORD_MEASURES)
    for table in (measures.FINAL, measures.RECORDED):
        for name, entry in table.items():
            assert entry.description and entry.label, name


def test_the_optimizer_sees_the_shared_global_step(problem, monkeypatch):
    # The refreshing optimizers branch on `step`: the program
    # passes the unbatched scan index: one scalar per step for the whole group.
    model, x, y, _ = problem
    seen, real = [], tx.train_step

    def train_step(*args, step=None, **kwargs):
        jax.debug.callback(lambda s: seen.append(np.asarray(s)), step)
        return real(*args, **kwargs)

    monkeypatch.setattr(tx, "train_step", train_step)
    program = make_group_program(model, _adam, Settings(6, BATCH, 3), x, y)
    jax.block_until_ready(program({"learning_rate": jnp.asarray([0.01, 0.02])},
                                  jnp.asarray([0, 1], jnp.int32)))
    assert [s.shape for s in seen] == [()] * 6
    assert sorted(int(s) for s in seen) == list(range(6))
