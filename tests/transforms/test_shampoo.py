"""Shampoo against dense numpy references, optax's Adam, and the ravine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.transforms import _second_order_ravine as ravine
from transforms import _second_order_blocks as blocks
from transforms.shampoo import ShampooState, scale_by_shampoo, shampoo


def np_inv_root(s, p, eps):
    w, v = np.linalg.eigh(s)
    return (v * (np.maximum(w, 0) + eps) ** (-1.0 / p)) @ v.T


def grads_sequence(shape, n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=shape) * (1 + i) for i in range(n)]


@pytest.mark.parametrize("jit", [False, True])
def test_matrix_direction_matches_dense_numpy(jit):
    eps = 1e-3
    opt = scale_by_shampoo(b1=0.0, b2=1.0, eps=eps, graft="none",
                           start_preconditioning_step=0, precondition_every=1)
    gs = grads_sequence((5, 4), 3)
    state = opt.init(jnp.zeros((5, 4)))
    update = jax.jit(opt.update) if jit else opt.update
    L, R = np.zeros((5, 5)), np.zeros((4, 4))
    for g in gs:
        u, state = update(jnp.asarray(g), state)
        L, R = L + g @ g.T, R + g.T @ g
        want = np_inv_root(L, 4, eps) @ g @ np_inv_root(R, 4, eps)
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-8)
    assert isinstance(state, ShampooState)


def test_rank3_tensor_uses_power_one_sixth():
    eps = 1e-2
    g = grads_sequence((3, 4, 5), 1)[0]
    # block_size 5 keeps the three dimensions apart (3 * 4 > 5: no merging)
    opt = scale_by_shampoo(b1=0.0, b2=1.0, eps=eps, graft="none", block_size=5,
                           start_preconditioning_step=0)
    u, _ = opt.update(jnp.asarray(g), opt.init(jnp.zeros((3, 4, 5))))
    want = g
    for i in range(3):
        unf = np.moveaxis(g, i, 0).reshape(g.shape[i], -1)
        p = np_inv_root(unf @ unf.T, 6, eps)
        want = np.moveaxis(np.tensordot(p, want, axes=([1], [i])), 0, i)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-8)


def test_blocked_matrix_equals_independent_blocks():
    eps, bs = 1e-3, 3
    opt = scale_by_shampoo(b1=0.0, b2=1.0, eps=eps, graft="none", block_size=bs,
                           start_preconditioning_step=0, precondition_every=1)
    gs = grads_sequence((7, 5), 2, seed=3)
    state, update = opt.init(jnp.zeros((7, 5))), jax.jit(opt.update)
    for g in gs:
        u, state = update(jnp.asarray(g), state)
    # 7 rows -> blocks [0:3], [3:6], [6:7]; 5 columns -> [0:3], [3:5]
    want = np.zeros((7, 5))
    for r in (slice(0, 3), slice(3, 6), slice(6, 7)):
        for c in (slice(0, 3), slice(3, 5)):
            L = sum(g[r, c] @ g[r, c].T for g in gs)
            R = sum(g[r, c].T @ g[r, c] for g in gs)
            want[r, c] = np_inv_root(L, 4, eps) @ gs[-1][r, c] @ np_inv_root(R, 4, eps)
    np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-8)


def test_roots_refresh_only_every_period_and_stats_every():
    eps = 1e-3
    opt = scale_by_shampoo(b1=0.0, b2=1.0, eps=eps, graft="none", precondition_every=3,
                           stats_every=2, start_preconditioning_step=0)
    gs = grads_sequence((4, 3), 5, seed=1)
    state, update = opt.init(jnp.zeros((4, 3))), jax.jit(opt.update)
    L, R = np.zeros((4, 4)), np.zeros((3, 3))
    roots = None
    for t, g in enumerate(gs):
        u, state = update(jnp.asarray(g), state)
        if t % 2 == 0:
            L, R = L + g @ g.T, R + g.T @ g
        if t % 3 == 0:
            roots = np_inv_root(L, 4, eps), np_inv_root(R, 4, eps)
        np.testing.assert_allclose(u, roots[0] @ g @ roots[1], rtol=1e-5, atol=1e-8)


def test_before_start_and_for_vectors_it_is_adam():
    params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    rng = np.random.default_rng(2)
    ours = shampoo(0.1, b1=0.9, b2=0.99, start_preconditioning_step=4, graft_eps=1e-8)
    adam = optax.adam(0.1, b1=0.9, b2=0.99, eps=1e-8)
    s1, s2 = ours.init(params), adam.init(params)
    up1, up2 = jax.jit(ours.update), jax.jit(adam.update)
    for t in range(6):
        g = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
        u1, s1 = up1(g, s1)
        u2, s2 = up2(g, s2)
        np.testing.assert_allclose(u1["b"], u2["b"], rtol=1e-12)
        if t < 4:
            np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-12)
        else:  # preconditioned, but grafted to Adam's norm
            np.testing.assert_allclose(jnp.linalg.norm(u1["w"]), jnp.linalg.norm(u2["w"]),
                                       rtol=1e-10)
            assert not np.allclose(u1["w"], u2["w"])


def test_sgd_graft_has_momentum_norm_and_shampoo_direction():
    eps = 1e-3
    g = grads_sequence((4, 3), 1, seed=5)[0]
    opt = scale_by_shampoo(b1=0.0, b2=1.0, eps=eps, graft="sgd", start_preconditioning_step=0)
    u, _ = opt.update(jnp.asarray(g), opt.init(jnp.zeros((4, 3))))
    raw = np_inv_root(g @ g.T, 4, eps) @ g @ np_inv_root(g.T @ g, 4, eps)
    np.testing.assert_allclose(u, raw * np.linalg.norm(g) / np.linalg.norm(raw), rtol=1e-8)


def test_failed_eigh_falls_back_to_previous_root_and_never_nan(monkeypatch):
    params = jnp.zeros((4, 3))
    g = jnp.asarray(grads_sequence((4, 3), 1)[0])
    opt = scale_by_shampoo(b1=0.0, b2=0.99, start_preconditioning_step=0,
                           precondition_every=1)
    adam = optax.scale_by_adam(b1=0.0, b2=0.99, eps=1e-8)
    monkeypatch.setattr(blocks, "_eigh", lambda x: (jnp.full(x.shape[:-1], jnp.nan),
                                                    jnp.full(x.shape, jnp.nan)))
    u, state = jax.jit(opt.update)(g, opt.init(params))
    assert np.all(np.isfinite(u))
    for r in state.roots[0]:  # the identity it started from
        np.testing.assert_array_equal(r[0], np.eye(r.shape[-1]))
    # identity roots: Shampoo's direction is the gradient, grafted to Adam's norm
    ua, _ = adam.update(g, adam.init(params))
    np.testing.assert_allclose(u, g * np.linalg.norm(ua) / np.linalg.norm(g), rtol=1e-10)


def test_overflowing_float32_statistics_emit_no_nan():
    params = jnp.zeros((3, 3), jnp.float32)
    opt = shampoo(0.1, start_preconditioning_step=0, precondition_every=1)
    state, update = opt.init(params), jax.jit(opt.update)
    for scale in (1.0, 1e25, 1.0):  # 1e25² overflows float32
        g = jnp.full((3, 3), scale, jnp.float32) * jnp.arange(1.0, 10.0).reshape(3, 3)
        u, state = update(g.astype(jnp.float32), state)
        assert np.all(np.isfinite(np.asarray(u)))


def test_inverse_root_keeps_previous_for_bad_blocks():
    good = np.diag([4.0, 9.0])
    stat = jnp.asarray(np.stack([good, np.full((2, 2), np.inf)]))
    prev = jnp.asarray(np.stack([np.eye(2), 7 * np.eye(2)]))
    out = blocks.inverse_root(stat, 2.0, 0.0, prev)
    np.testing.assert_allclose(out[0], np.diag([0.5, 1 / 3]), rtol=1e-12)
    np.testing.assert_array_equal(out[1], 7 * np.eye(2))


def test_vmap_over_learning_rate_matches_loop():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    gs = [{"w": jnp.asarray(g), "b": jnp.asarray(g[0])} for g in grads_sequence((4, 3), 4)]

    def run(lr):
        opt = shampoo(lr, start_preconditioning_step=1, precondition_every=2)
        p, s = params, opt.init(params)
        for g in gs:
            u, s = opt.update(g, s)
            p = optax.apply_updates(p, u)
        return p

    lrs = jnp.asarray([0.01, 0.1, 0.3])
    batched = jax.jit(jax.vmap(run))(lrs)
    for i, lr in enumerate(lrs):
        one = jax.jit(run)(lr)
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
            np.testing.assert_allclose(a[i], b, rtol=1e-10)


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b2=1.5), "b2"), (dict(eps=0.0), "eps"),
    (dict(block_size=1), "block_size"), (dict(precondition_every=0), "precondition_every"),
    (dict(stats_every=2.5), "stats_every"), (dict(graft="rmsprop"), "graft"),
    (dict(start_preconditioning_step=-1), "start_preconditioning_step"),
    (dict(exponent=-2.0), "exponent"),
])
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_shampoo(**kwargs)


def test_ravine_far_fewer_steps_than_tuned_sgd_and_adam():
    sgd, adam = ravine.baselines(num_steps=4000)
    ours = ravine.best_steps(
        lambda lr: shampoo(lr, b1=0.0, b2=1.0, graft="none", start_preconditioning_step=1,
                           precondition_every=1), np.geomspace(0.01, 3, 8), 1000)
    assert ours <= 1000, ours
    assert ours < 0.5 * min(sgd, adam), (ours, sgd, adam)


def test_bias_correction_in_float64_with_decaying_statistics():
    """b2 < 1 in float64 against the EMA written plainly (issue 17: the correction was
    computed in float32, off by √((1 − float32(b2)) / (1 − b2)) = 6.4e-6 at 0.999)."""
    b2, eps = 0.999, 1e-12
    opt = scale_by_shampoo(b1=0.0, b2=b2, eps=eps, graft="none",
                           start_preconditioning_step=0, precondition_every=1)
    gs = grads_sequence((5, 4), 4, seed=7)
    state, update = opt.init(jnp.zeros((5, 4), jnp.float64)), jax.jit(opt.update)
    L, R = np.zeros((5, 5)), np.zeros((4, 4))
    for n, g in enumerate(gs, start=1):
        u, state = update(jnp.asarray(g), state)
        L, R = b2 * L + (1 - b2) * g @ g.T, b2 * R + (1 - b2) * g.T @ g
        c = 1 - b2 ** n
        want = np_inv_root(L / c, 4, eps) @ g @ np_inv_root(R / c, 4, eps)
        np.testing.assert_allclose(u, want, rtol=1e-9)


def test_weight_decay_before_preconditioning_is_adamw():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    ours = shampoo(0.1, b1=0.9, b2=0.99, weight_decay=0.05, graft_eps=1e-8,
                   start_preconditioning_step=10**6)
    ref = optax.adamw(0.1, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.05)
    s1, s2, p1, p2 = ours.init(params), ref.init(params), params, params
    for g in [{"w": jnp.asarray(g), "b": jnp.asarray(g[0])}
              for g in grads_sequence((4, 3), 4, seed=9)]:
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
