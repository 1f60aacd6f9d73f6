"""K-FAC inside vmapped groups: one refresh per period, traced hyper-parameters, members
equal to themselves run alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import transforms as tx
from tests.landscape import models as m

PERIOD, STEPS = 3, 7


@pytest.fixture(scope="module")
def problem():
    params = m.mlp_params(jax.random.key(0), sizes=(5, 8, 3))
    batch = m.classification_data(jax.random.key(1), n=32)
    layers = tx.find_dense_layers(m.mlp_apply, params, batch[0][:1])
    return params, batch, layers


def _opt(layers, lr, damping=1e-2, decay=0.95, momentum=0.0):
    return tx.make("kfac", learning_rate=lr, layers=layers, damping=damping, decay=decay,
                   momentum=momentum, inverse_every=PERIOD)


def _step(opt, params, state, batch, t, step):
    return tx.train_step(opt, m.ce_loss, params, state, batch, jax.random.key(t),
                         apply_fn=m.mlp_apply, step=step)


def _primitives(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for j in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(j, "jaxpr", None)
                if inner is not None:
                    yield from _primitives(getattr(inner, "jaxpr", inner))


def test_unbatched_step_keeps_the_refresh_a_real_cond_under_vmap(problem):
    params, batch, layers = problem
    lrs = jnp.asarray([0.05, 0.1])

    states = jax.vmap(lambda lr: _opt(layers, lr).init(params))(lrs)   # batched

    def member(lr, state, step):
        return _step(_opt(layers, lr), params, state, batch, 0, step).params

    with_step = jax.make_jaxpr(jax.vmap(member, in_axes=(0, 0, None)))(lrs, states, 0)
    without = jax.make_jaxpr(jax.vmap(lambda lr, s: member(lr, s, None)))(lrs, states)
    assert "cond" in set(_primitives(with_step.jaxpr))
    assert "cond" not in set(_primitives(without.jaxpr))   # vmap made it a select


def _run_group(layers, params, batch, hyper):
    def member(h, state, p, t):
        p, state, _ = _step(_opt(layers, **h), p, state, batch, t, t)
        return p, state

    def body(carry, t):
        p, s = jax.vmap(member, in_axes=(0, 0, 0, None))(hyper, carry[1], carry[0], t)
        return (p, s), None

    n = len(hyper["lr"])
    states = jax.vmap(lambda h: _opt(layers, **h).init(params))(hyper)
    stacked = jax.tree.map(lambda a: jnp.stack([a] * n), params)
    (p, s), _ = jax.lax.scan(body, (stacked, states), jnp.arange(STEPS))
    return p, s


def _run_alone(layers, params, batch, h):
    opt = _opt(layers, **h)

    def body(carry, t):
        p, s, _ = _step(opt, carry[0], carry[1], batch, t, t)
        return (p, s), None

    (p, s), _ = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(STEPS))
    return p, s


@pytest.mark.timeout(300)
def test_a_group_with_traced_hyperparameters_equals_its_members_alone(problem):
    params, batch, layers = problem
    hyper = {"lr": [0.05, 0.2, 0.1], "damping": [1e-2, 1e-1, 3e-3],
             "decay": [0.95, 0.8, 0.9], "momentum": [0.5, 0.0, 0.9]}
    group_p, group_s = jax.jit(functools.partial(_run_group, layers))(
        params, batch, {k: jnp.asarray(v) for k, v in hyper.items()})
    inner = group_s[0]           # scale_by_kfac's state inside the chain
    # every member refreshed at steps 0, 3, 6: once per period for the whole group
    np.testing.assert_array_equal(inner.refreshes, [-(-STEPS // PERIOD)] * 3)
    for i in range(3):
        h = {k: v[i] for k, v in hyper.items()}   # Python floats: nothing traced
        alone, _ = jax.jit(lambda p, b: _run_alone(layers, p, b, h))(params, batch)
        for a, b in zip(jax.tree.leaves(group_p), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[i], b, rtol=2e-6, atol=1e-7)


def _transformer():
    from experiments.models import Transformer1D, pure

    apply_fn, params = pure(Transformer1D(3, length=8, patch_size=2, dim=8, depth=1,
                                          num_heads=2, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (4, 8))
    members = jax.tree.map(lambda a: jnp.stack([a, 1.1 * a]), params)
    return apply_fn, params, members, x


def test_every_dense_layer_of_the_transformer_under_vmap():
    apply_fn, params, members, x = _transformer()
    layers = tx.find_dense_layers(apply_fn, params, x[:1])
    kernels = [path for path, leaf in jax.tree.leaves_with_path(params)
               if leaf.ndim == 2 and "position" not in jax.tree_util.keystr(path)]
    assert len(layers) == len(kernels) == 6   # embed, qkv, proj, fc1, fc2, head
    stats = jax.eval_shape(jax.vmap(lambda p: tx.kfac_statistics(
        apply_fn, p, x, key=jax.random.key(0))), members)
    sizes = [(layer.fan_in + 1, layer.fan_out) for layer in layers]
    assert [(a.shape, g.shape) for a, g in zip(stats.activations, stats.gradients)] == [
        ((2, a, a), (2, g, g)) for a, g in sizes]


@pytest.mark.slow
def test_transformer_statistics_under_vmap_equal_each_member_alone():
    apply_fn, _, members, x = _transformer()
    stats = jax.jit(jax.vmap(lambda p: tx.kfac_statistics(
        apply_fn, p, x, key=jax.random.key(0))))(members)
    alone = jax.jit(lambda p: tx.kfac_statistics(apply_fn, p, x, key=jax.random.key(0)))
    for i in range(2):
        one = alone(jax.tree.map(lambda a: a[i], members))
        for a, b in zip(jax.tree.leaves(stats), jax.tree.leaves(one)):
            np.testing.assert_allclose(a[i], b, rtol=1e-9, atol=1e-12)
