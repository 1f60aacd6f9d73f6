"""K-FAC inside vmapped groups: one refresh per period, traced hyper-parameters, members
equal to themselves run alone."""

import functools

import jax
import jax.extend
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


_LAPACK = ("eigh", "cholesky", "triangular_solve", "geqrf", "householder_product", "lu")


def _lapack_operand_ranks(jaxpr):
    """(primitive, rank of its first operand) of every LAPACK call, recursively."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _LAPACK:
            out.append((eqn.primitive.name, eqn.invars[0].aval.ndim))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _lapack_operand_ranks(sub)
    return out


@pytest.mark.parametrize("tikhonov", ["factored", "exact"])
def test_a_vmapped_refresh_decomposes_one_matrix_at_a_time(problem, tikhonov):
    """Batched `potrf`/`eigh` split their batch over XLA's CPU pool and block on it; two
    at once deadlocked a 2-core machine (gdb: both pool threads in ParallelBatchMap).
    Under vmap every LAPACK call must see a single matrix."""
    params, batch, layers = problem
    lrs = jnp.asarray([0.05, 0.1, 0.2])

    def member(lr, state):
        opt = tx.make("kfac", learning_rate=lr, layers=layers, tikhonov=tikhonov)
        return _step(opt, params, state, batch, 0, 0).opt_state

    states = jax.vmap(lambda lr: tx.make("kfac", learning_rate=lr, layers=layers,
                                         tikhonov=tikhonov).init(params))(lrs)
    jaxpr = jax.make_jaxpr(jax.vmap(member))(lrs, states)
    ranks = _lapack_operand_ranks(jaxpr.jaxpr)
    assert ranks and all(r == 2 for _, r in ranks), ranks


@pytest.mark.timeout(120)
def test_a_group_of_eight_never_hangs(problem):
    """Eight members, three refresh periods, 20 times in a row (the runner's K-FAC group
    hung in batched Cholesky before the refresh went one matrix at a time)."""
    params, batch, layers = problem
    hyper = {"lr": jnp.geomspace(0.01, 0.3, 8), "damping": jnp.full(8, 1e-2),
             "decay": jnp.full(8, 0.95), "momentum": jnp.zeros(8)}
    run = jax.jit(functools.partial(_run_group, layers))
    first = jax.tree.leaves(run(params, batch, hyper)[0])
    for _ in range(19):
        for a, b in zip(jax.tree.leaves(run(params, batch, hyper)[0]), first):
            np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(a)) for a in first)
