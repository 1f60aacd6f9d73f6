"""Vanishing and exploding gradients: the study's per-layer norms against explicit
per-layer jax.grad computations, and the qualitative claims on a reduced network."""

import math

import jax
import jax.numpy as jnp

import pytest

import landscape as ls
import experiments
from experiments import config as cfglib
from experiments.studies import gradient_flow as gf


def _batch(n=64):
    # Gaussian inputs with MNIST-1D's shape: the claims concern the initialization, and
    # this keeps dataset generation out of the default test run.
    k1, k2 = jax.random.split(jax.random.key(3))
    return jax.random.normal(k1, (n, 40)), jax.random.randint(k2, (n,), 0, 10)


def _cfg(**kw):
    cfg = experiments.load("gradient_flow", ["width=32", "num_examples=64"])
    return experiments.validate({**cfg, **kw})


def test_norms_match_explicit_per_layer_gradients():
    cfg = _cfg(depth=4, width=16, num_examples=32)
    batch = _batch(32)
    out = gf.measure(cfg, "tanh", 1.5, True, batch)
    x, y = batch
    sizes = [x.shape[1]] + [cfg["width"]] * 3 + [10]
    params = gf.init(jax.random.key(cfg["seed"]), sizes, "tanh", 1.5)
    alpha = gf.alpha_of(cfg)
    zeros = [jnp.zeros((x.shape[0], s)) for s in sizes[1:]]

    def loss(p, offsets):
        return ls.cross_entropy(gf.apply(p, x, "tanh", True, alpha, offsets), y)

    for l in range(len(params)):
        # One layer at a time: the gradient with respect to that layer's offset only ...
        def of_offset(o):
            return loss(params, zeros[:l] + [o] + zeros[l + 1:])
        err = jnp.linalg.norm(jax.grad(of_offset)(zeros[l]))
        assert out["error"][l] == pytest.approx(float(err), rel=1e-4)

        # ... and with respect to that layer's kernel and bias only.
        def of_layer(q):
            return loss(params[:l] + [q] + params[l + 1:], None)
        g = jax.grad(of_layer)(params[l])
        norm = math.sqrt(sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g)))
        assert out["param"][l] == pytest.approx(norm, rel=1e-4)
    assert out["error_ratio"] == pytest.approx(out["error"][0] / out["error"][-1], rel=1e-6)


@pytest.mark.parametrize("activation", ["linear",
                                        pytest.param("relu", marks=pytest.mark.slow)])
def test_error_signal_vanishes_explodes_and_skips_keep_it_near_one(activation):
    cfg = _cfg()
    batch = _batch()
    r = {(g, s): gf.measure(cfg, activation, g, s, batch)["error_ratio"]
         for g in (0.5, 2.0) for s in (False, True)}
    assert r[(0.5, False)] < 1e-3          # vanishing towards the input
    assert r[(2.0, False)] > 1e3           # exploding
    for g in (0.5, 2.0):                   # skips: at least twice as close to 1 in log scale
        assert abs(math.log(r[(g, True)])) < abs(math.log(r[(g, False)])) / 2
    assert 0.1 < r[(0.5, True)] < 10


def test_bad_config_is_a_config_error():
    with pytest.raises(cfglib.ConfigError, match="activations"):
        experiments.load("gradient_flow", ['activations=["swish"]'])
    with pytest.raises(cfglib.ConfigError, match="depth"):
        experiments.load("gradient_flow", ["depth=2"])
