"""Shampoo, SOAP and K-FAC through `make` and `train_step` equal the direct transforms."""

import jax
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import transforms as tx
from tests.landscape import models as m


@pytest.fixture(scope="module")
def problem():
    params = m.mlp_params(jax.random.key(0), sizes=(5, 8, 3))
    batch = m.classification_data(jax.random.key(1), n=32)
    return params, batch


def _run(opt, params, batch, steps=4, apply_fn=None, direct=None):
    state = opt.init(params)
    for t in range(steps):
        key = jax.random.key(100 + t)
        if direct is None:
            params, state, _ = tx.train_step(opt, m.ce_loss, params, state, batch, key,
                                             apply_fn=apply_fn)
        else:
            grads = jax.grad(m.ce_loss)(params, batch)
            updates, state = opt.update(grads, state, params, **direct(params, key))
            params = optax.apply_updates(params, updates)
    return ravel_pytree(params)[0]


@pytest.mark.parametrize("name, direct", [
    ("shampoo", lambda: tx.shampoo(0.01, precondition_every=2, start_preconditioning_step=1)),
    ("soap", lambda: tx.soap(0.01, precondition_every=2)),
])
def test_make_equals_the_direct_transform(problem, name, direct):
    params, batch = problem
    hyper = dict(learning_rate=0.01, precondition_every=2)
    if name == "shampoo":
        hyper["start_preconditioning_step"] = 1
    a = _run(tx.make(name, **hyper), params, batch)
    b = _run(direct(), params, batch, direct=lambda p, k: {})
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_kfac_through_train_step_equals_explicit_statistics(problem):
    params, batch = problem
    layers = tx.find_dense_layers(m.mlp_apply, params, batch[0][:1])
    via_step = _run(tx.make("kfac", learning_rate=0.05, layers=layers, inverse_every=2),
                    params, batch, apply_fn=m.mlp_apply)
    direct = tx.kfac(0.05, layers, inverse_every=2)
    explicit = _run(direct, params, batch, direct=lambda p, k: {
        "statistics": tx.kfac_statistics(m.mlp_apply, p, batch[0], key=k)})
    np.testing.assert_allclose(via_step, explicit, rtol=1e-6, atol=1e-9)


def test_kfac_without_statistics_or_model_is_an_error(problem):
    params, batch = problem
    layers = tx.find_dense_layers(m.mlp_apply, params, batch[0][:1])
    opt = tx.make("kfac", learning_rate=0.1, layers=layers)
    with pytest.raises(ValueError, match="apply_fn"):
        tx.train_step(opt, m.ce_loss, params, opt.init(params), batch, jax.random.key(0))
    with pytest.raises(ValueError, match="find_dense_layers"):
        tx.make("kfac", learning_rate=0.1, layers="dense")
