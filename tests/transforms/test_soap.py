"""SOAP against optax's Adam, a plain numpy SOAP, and the ravine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.transforms import _second_order_ravine as ravine
from transforms import _second_order_blocks as blocks
from transforms.soap import SoapState, scale_by_soap, soap


def random_grads(like, n, seed=0):
    rng = np.random.default_rng(seed)
    return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), like)
            for _ in range(n)]


def numpy_soap(gs, b1, b2, eps, every, basis):
    """The paper's algorithm for one matrix, written plainly, first refresh at step 1.

    (A basis from a single gradient is its singular vectors, in which the rotated
    gradient is diagonal: its off-diagonal v ≈ 0 would turn round-off into eps-sized
    differences between any two implementations.)
    """
    m_, n_ = gs[0].shape
    L, R = np.zeros((m_, m_)), np.zeros((n_, n_))
    QL, QR = np.eye(m_), np.eye(n_)
    m, v = np.zeros((m_, n_)), np.zeros((m_, n_))
    out = []
    for t, g in enumerate(gs):
        L, R = b2 * L + (1 - b2) * g @ g.T, b2 * R + (1 - b2) * g.T @ g
        if t >= 1 and (t - 1) % every == 0:
            if basis == "eigh" or t == 1:
                # columns by descending eigenvalue, the order v is kept in
                QL, QR = np.linalg.eigh(L)[1][:, ::-1], np.linalg.eigh(R)[1][:, ::-1]
            else:
                for side in (0, 1):
                    S, Q = (L, QL) if side == 0 else (R, QR)
                    order = np.argsort(-np.diag(Q.T @ S @ Q), kind="stable")
                    Q = np.linalg.qr(S @ Q[:, order])[0]
                    v = v[order] if side == 0 else v[:, order]
                    QL, QR = (Q, QR) if side == 0 else (QL, Q)
        m = b1 * m + (1 - b1) * g
        g_rot = QL.T @ g @ QR
        v = b2 * v + (1 - b2) * g_rot**2
        m_rot = QL.T @ (m / (1 - b1 ** (t + 1))) @ QR
        out.append(QL @ (m_rot / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)) @ QR.T)
    return out


def test_identity_basis_is_adam_step_for_step():
    params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros(4), "conv": jnp.zeros((3, 2, 4, 5)),
              "big": jnp.zeros((7, 3))}
    ours = soap(0.01, b1=0.9, b2=0.99, eps=1e-8, block_size=3,
                start_preconditioning_step=10**6)   # the bases never leave the identity
    adam = optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-8)
    s1, s2 = ours.init(params), adam.init(params)
    up1, up2 = jax.jit(ours.update), jax.jit(adam.update)
    for g in random_grads(params, 6):
        u1, s1 = up1(g, s1)
        u2, s2 = up2(g, s2)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert isinstance(s1[0], SoapState)


@pytest.mark.parametrize("basis", ["eigh", "qr"])
def test_matches_numpy_soap(basis):
    b1, b2, eps, every = 0.9, 0.9, 1e-8, 2
    gs = [g * (1 + 0.3 * i) for i, g in enumerate(random_grads(jnp.zeros((3, 4)), 7, 4))]
    opt = scale_by_soap(b1, b2, eps, precondition_every=every, basis=basis,
                        start_preconditioning_step=1)
    state, update = opt.init(jnp.zeros((3, 4))), jax.jit(opt.update)
    want = numpy_soap([np.asarray(g) for g in gs], b1, b2, eps, every, basis)
    for g, w in zip(gs, want):
        u, state = update(g, state)
        np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-9)


def test_qr_basis_approaches_eigenbasis_on_fixed_statistics():
    g = random_grads(jnp.zeros((4, 4)), 1, 7)[0]
    opt = scale_by_soap(b2=0.5, precondition_every=1, basis="qr")
    state, update = opt.init(g), jax.jit(opt.update)
    state = update(g, state)[1]
    for _ in range(60):   # the statistics converge to G Gᵀ; the power steps follow
        state = update(g, state)[1]
    q = state.bases[0][0][0]
    w, v = np.linalg.eigh(np.asarray(g @ g.T))
    # columns span the eigenvectors in descending order (up to sign)
    np.testing.assert_allclose(np.abs(q.T @ v[:, ::-1]), np.eye(4), atol=1e-6)


def test_failed_eigh_keeps_identity_basis_and_is_adam(monkeypatch):
    params = jnp.zeros((4, 3))
    monkeypatch.setattr(blocks, "_eigh", lambda x: (jnp.full(x.shape[:-1], jnp.nan),
                                                    jnp.full(x.shape, jnp.nan)))
    ours, adam = scale_by_soap(precondition_every=1), optax.scale_by_adam(0.95, 0.95)
    s1, s2 = ours.init(params), adam.init(params)
    for g in random_grads(params, 3):
        u1, s1 = jax.jit(ours.update)(g, s1)
        u2, s2 = adam.update(g, s2)
        assert np.all(np.isfinite(u1))
        np.testing.assert_allclose(u1, u2, rtol=1e-12)


def test_vmap_over_learning_rate_matches_loop():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    gs = random_grads(params, 4, 1)

    def run(lr):
        opt = soap(lr, precondition_every=2, basis="qr")
        p, s = params, opt.init(params)
        for g in gs:
            u, s = opt.update(g, s)
            p = optax.apply_updates(p, u)
        return p

    lrs = jnp.asarray([0.01, 0.1, 0.3])
    batched = jax.jit(jax.vmap(run))(lrs)
    for i, lr in enumerate(lrs):
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(jax.jit(run)(lr))):
            np.testing.assert_allclose(a[i], b, rtol=1e-10)


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=-0.1), "b1"), (dict(b2=1.0), "b2"), (dict(eps=-1.0), "eps"),
    (dict(shampoo_b2=2.0), "shampoo_b2"), (dict(block_size=0), "block_size"),
    (dict(precondition_every=0), "precondition_every"), (dict(basis="svd"), "basis"),
    (dict(start_preconditioning_step=-3), "start_preconditioning_step"),
])
def test_bad_hyperparameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        scale_by_soap(**kwargs)


def test_ravine_far_fewer_steps_than_tuned_sgd_and_adam():
    sgd, adam = ravine.baselines(num_steps=4000)
    ours = ravine.best_steps(
        lambda lr: soap(lr, b1=0.9, b2=0.999, precondition_every=1,
                        start_preconditioning_step=1), np.geomspace(1e-3, 1, 8), 1000)
    assert ours <= 1000, ours
    assert ours < 0.5 * min(sgd, adam), (ours, sgd, adam)


def test_weight_decay_with_identity_basis_is_adamw():
    params = {"w": jnp.ones((5, 4)), "b": jnp.ones(4)}
    ours = soap(0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1,
                start_preconditioning_step=10**6)
    ref = optax.adamw(0.01, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
    s1, s2, p1, p2 = ours.init(params), ref.init(params), params, params
    for g in random_grads(params, 4, seed=2):
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def _along(x, m, i):
    """Each block of `x` (`(n, b_1, …, b_k)`) times `m[block]` (`(n, b, b)`) along
    dimension i: out[.., a, ..] = Σ_j m[a, j] x[.., j, ..]."""
    xm = jnp.moveaxis(x, 1 + i, -1)
    mt = jnp.swapaxes(m, -1, -2).reshape((m.shape[0],) + (1,) * (x.ndim - 3) + m.shape[1:])
    return jnp.moveaxis(xm @ mt, -1, 1 + i)


def soap_momentum_in_own_coordinates(gs, b1, b2, eps, every, start, basis, block_size):
    """The earlier implementation, written plainly: Adam's first moment kept in the
    parameters' own coordinates and rotated into the eigenbases at every step. Returns
    the updates of every step and the final first moments (like params)."""
    leaves, treedef = jax.tree.flatten(gs[0])
    plans = [blocks.make_plan(np.shape(p), block_size) for p in leaves]
    stats = [[jnp.zeros((pl.total_blocks, b, b)) for b in pl.block] for pl in plans]
    bases = [[jnp.broadcast_to(jnp.eye(b), (pl.total_blocks, b, b)) for b in pl.block]
             for pl in plans]
    mu = [jnp.zeros(np.shape(p)) for p in leaves]
    nu = [jnp.zeros((pl.total_blocks,) + pl.block) if pl.preconditioned
          else jnp.zeros(np.shape(p)) for pl, p in zip(plans, leaves)]
    out = []
    for t, g_tree in enumerate(gs):
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        refresh = t >= start and (t - start) % every == 0
        ups = []
        for k, (pl, g) in enumerate(zip(plans, treedef.flatten_up_to(g_tree))):
            mu[k] = b1 * mu[k] + (1 - b1) * g
            if not pl.preconditioned:
                nu[k] = b2 * nu[k] + (1 - b2) * g * g
                ups.append((mu[k] / c1) / (jnp.sqrt(nu[k] / c2) + eps))
                continue
            gb = blocks.to_blocks(g, pl)
            stats[k] = [b2 * s + (1 - b2) * blocks.mode_statistic(gb, i)
                        for i, s in enumerate(stats[k])]
            for i in range(pl.rank) if refresh else ():
                if basis == "eigh" or t == start:
                    bases[k][i] = blocks.eigenbasis(stats[k][i], bases[k][i])
                else:   # sort the columns, one power step, v follows the columns
                    bases[k][i], order = blocks.qr_power_step(stats[k][i], bases[k][i])
                    idx = order.reshape([order.shape[0]] + [order.shape[1] if d == i else 1
                                                            for d in range(pl.rank)])
                    nu[k] = jnp.take_along_axis(nu[k], jnp.broadcast_to(idx, nu[k].shape),
                                                axis=1 + i)
            g_rot, m_rot = gb, blocks.to_blocks(mu[k] / c1, pl)
            for i, q in enumerate(bases[k]):
                qt = jnp.swapaxes(q, -1, -2)
                g_rot, m_rot = _along(g_rot, qt, i), _along(m_rot, qt, i)
            nu[k] = b2 * nu[k] + (1 - b2) * g_rot * g_rot
            d = m_rot / (jnp.sqrt(nu[k] / c2) + eps)
            for i, q in enumerate(bases[k]):
                d = _along(d, q, i)
            ups.append(blocks.from_blocks(d, pl))
        out.append(treedef.unflatten(ups))
    return out, treedef.unflatten(mu)


@pytest.mark.timeout(600)   # eigh on CPU: never let a decomposition hang the suite
@pytest.mark.parametrize("basis", ["eigh", "qr"])
def test_rotated_momentum_matches_momentum_in_own_coordinates(basis):
    """mu kept in the eigenbases (re-expressed at each refresh) is the earlier
    algorithm (mu in the parameters' coordinates, rotated every step) to round-off,
    over several refreshes, on a blocked and padded matrix, a 3-D tensor and a vector."""
    like = {"w": jnp.zeros((6, 5)), "conv": jnp.zeros((3, 2, 5)), "b": jnp.zeros(5)}
    gs = [jax.tree.map(lambda x, i=i: x * (1 + 0.2 * i), g)
          for i, g in enumerate(random_grads(like, 25, seed=5))]
    b1, b2, eps, every, start, bs = 0.9, 0.95, 1e-8, 3, 1, 4
    opt = scale_by_soap(b1, b2, eps, precondition_every=every, basis=basis,
                        start_preconditioning_step=start, block_size=bs)
    want, want_mu = soap_momentum_in_own_coordinates(gs, b1, b2, eps, every, start,
                                                      basis, bs)
    state, update = opt.init(like), jax.jit(opt.update)
    for g, w in zip(gs, want):
        u, state = update(g, state)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(w)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    # the state's mu, taken back to the parameters' coordinates, is the earlier mu
    for p, m, qs, w in zip(jax.tree.leaves(like), state.mu, state.bases,
                           jax.tree.leaves(want_mu)):
        pl = blocks.make_plan(p.shape, bs)
        for i, q in enumerate(qs):
            m = _along(m, q, i)
        got = blocks.from_blocks(m, pl) if pl.preconditioned else m
        np.testing.assert_allclose(got, w, rtol=1e-10, atol=1e-14)
    # leaves b, conv, w: w as 2 × 2 blocks of 3 × 3, conv as 2 blocks of 3 × 2 × 3
    assert [m.shape for m in state.mu] == [(5,), (2, 3, 2, 3), (4, 3, 3)]
