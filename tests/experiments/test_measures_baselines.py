"""The final measures added for the generalization-measures benchmark: the parameter
norm and path norm against numpy, the magnitude-aware PAC-Bayes flatness and the
Fisher-Rao norm against direct calls of `landscape`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import landscape as ls
from experiments.measures import MeasureSettings, make_measure_program
from experiments.train import build_model, loss_function


def _measured(names):
    model = build_model({"name": "mlp", "hidden": [8, 6], "activation": "relu"}, 5, 3)
    loss_fn = loss_function(model.apply_fn, "cross_entropy")
    x = jax.random.normal(jax.random.key(1), (40, 5))
    y = jax.random.randint(jax.random.key(2), (40,), 0, 3)
    members = [model.init(jax.random.key(s)) for s in (3, 4)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *members)
    settings = MeasureSettings(names, 40, 20, 0.05, 0.5, 5, 4, 1e-3, 0.1, 10, 10)
    out = make_measure_program(model.apply_fn, loss_fn, settings, (x, y), (x, y))(
        stacked, jax.random.key(0))
    return loss_fn, (x, y), members, out


def test_norms_against_numpy():
    _, _, members, out = _measured(("param_norm", "path_norm"))
    for i, params in enumerate(members):
        leaves = [np.asarray(a, np.float64) for a in jax.tree.leaves(params)]
        np.testing.assert_allclose(out["param_norm"][i], sum(np.sum(a ** 2) for a in leaves),
                                   rtol=1e-5)
        # ReLU MLP on squared weights and an all-ones input: every unit is positive.
        h = np.ones(5)
        for layer in params["layers"].values():
            h = h @ np.asarray(layer["kernel"], np.float64) ** 2 + np.asarray(
                layer["bias"], np.float64) ** 2
        np.testing.assert_allclose(out["path_norm"][i], h.sum(), rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_magnitude_aware_pac_bayes_and_fisher_rao_are_landscapes():
    loss_fn, (x, y), members, out = _measured(("pac_bayes_magnitude", "fisher_rao"))
    keys = jax.random.split(jax.random.key(0), 2)
    for i, params in enumerate(members):
        want = ls.sharpness.pac_bayes(loss_fn, params, (x, y), key=keys[i], threshold=0.1,
                                      magnitude_aware=True, chunk_size=20).flatness
        np.testing.assert_allclose(out["pac_bayes_magnitude"][i], want, rtol=1e-4)
        want = ls.sharpness.fisher_rao_norm(loss_fn, params, (x, y), chunk_size=20)
        np.testing.assert_allclose(out["fisher_rao"][i], want, rtol=1e-4)
