"""tx.preconditioner against hand-computed moments and against each optimizer's own step.

With momentum off (b1 = 0) every optimizer here steps along −η P⁻¹ g, so the update it
returns is an independent reference for the P that `preconditioner` reads: applying
P^{-1/2} twice to g must give −update/η.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import landscape as ls
import transforms as tx
from transforms.shampoo import scale_by_shampoo
from transforms.soap import scale_by_soap

RNG = np.random.default_rng(0)
PARAMS = {"w": jnp.asarray(RNG.normal(size=(4, 3))), "b": jnp.asarray(RNG.normal(size=3))}
GRADS = [jax.tree.map(lambda p, i=i: jnp.asarray(RNG.normal(size=p.shape)) * (1 + i),
                      PARAMS) for i in range(3)]


def _run(opt, steps=3):
    state = opt.init(PARAMS)
    updates, update = None, jax.jit(opt.update)  # one dispatch per step: quicker
    for g in GRADS[:steps]:
        updates, state = update(g, state, PARAMS)
    return updates, state


def _apply_inverse(P, v):
    """P⁻¹ v for either form `preconditioner` returns."""
    if callable(P):
        return P(P(v))
    return jax.tree.map(lambda x, d: x / d, v, P)


def test_adam_after_three_steps_matches_hand_computation():
    b2, eps = 0.99, 1e-3
    _, state = _run(optax.adam(0.1, b1=0.9, b2=b2, eps=eps))
    P = tx.preconditioner(state, b2=b2, eps=eps)
    for name in PARAMS:
        nu = sum((1 - b2) * b2 ** (2 - i) * np.asarray(g[name]) ** 2
                 for i, g in enumerate(GRADS))
        want = np.sqrt(nu / (1 - b2 ** 3)) + eps
        np.testing.assert_allclose(P[name], want, rtol=1e-12)
    # The same state inside AdamW's chain, and with hyper-parameters recorded by
    # inject_hyperparams instead of passed.
    _, chained = _run(optax.adamw(0.1, b2=b2, eps=eps, weight_decay=1e-2))
    _, injected = _run(optax.inject_hyperparams(optax.adam)(0.1, b2=b2, eps=eps))
    for other in (tx.preconditioner(chained, b2=b2, eps=eps), tx.preconditioner(injected)):
        for name in PARAMS:
            np.testing.assert_allclose(other[name], P[name], rtol=1e-12)


@pytest.mark.parametrize("name,opt,hyper", [
    ("adam", optax.adam(0.1, b1=0.0, b2=0.9, eps=1e-2), dict(b2=0.9, eps=1e-2)),
    ("rmsprop", optax.rmsprop(0.1, decay=0.8, eps=1e-2), dict(decay=0.8, eps=1e-2)),
    ("rmsprop-corrected", optax.rmsprop(0.1, decay=0.8, eps=1e-2, eps_in_sqrt=False,
                                        bias_correction=True),
     dict(decay=0.8, eps=1e-2, eps_in_sqrt=False)),
    ("shampoo", optax.chain(scale_by_shampoo(b1=0.0, b2=0.9, eps=1e-2, graft="none",
                                             start_preconditioning_step=0,
                                             precondition_every=1),
                            optax.scale(-0.1)), {}),
    ("soap", optax.chain(scale_by_soap(b1=0.0, b2=0.9, eps=1e-2), optax.scale(-0.1)),
     dict(b2=0.9, eps=1e-2)),
])
def test_update_is_minus_lr_times_inverse_preconditioner(name, opt, hyper):
    updates, state = _run(opt)
    P = tx.preconditioner(state, **hyper)
    want = _apply_inverse(P, GRADS[2])
    for k in PARAMS:
        np.testing.assert_allclose(-np.asarray(updates[k]) / 0.1, want[k], rtol=1e-8,
                                   atol=1e-12, err_msg=f"{name}/{k}")


def _loss(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


BATCH = (jnp.asarray(RNG.normal(size=(6, 4))), jnp.asarray(RNG.normal(size=(6, 3))))


def _stepper(opt):
    return jax.jit(lambda state, key: tx.train_step(opt, _loss, PARAMS, state, BATCH, key))


def test_adahessian_and_sophia_divide_by_their_preconditioner():
    opt = tx.adahessian(learning_rate=0.1, b1=0.0, b2=0.9, eps=1e-2)
    state, step = opt.init(PARAMS), _stepper(opt)
    for t in range(3):
        new, state, _ = step(state, jax.random.key(t))
    g = jax.grad(_loss)(PARAMS, BATCH)
    want = _apply_inverse(tx.preconditioner(state, b2=0.9, eps=1e-2), g)
    for k in PARAMS:
        np.testing.assert_allclose((PARAMS[k] - new[k]) / 0.1, want[k], rtol=1e-8)
    # Sophia divides the bias-corrected momentum by max(γ h, ε), h the state's EMA
    # as it was before the step (the Hessian refresh comes after).
    opt = tx.sophia_h(learning_rate=0.1, b1=0.0, weight_decay=0.0, clip_threshold=None,
                      update_interval=1, gamma=0.5)
    state, step = opt.init(PARAMS), _stepper(opt)
    _, state, _ = step(state, jax.random.key(0))
    P = tx.preconditioner(state, gamma=0.5)
    new, _, _ = step(state, jax.random.key(1))
    want = _apply_inverse(P, g)
    for k in PARAMS:
        np.testing.assert_allclose((PARAMS[k] - new[k]) / 0.1, want[k], rtol=1e-8)


def test_errors_name_the_state_and_argument():
    with pytest.raises(ValueError, match="EmptyState"):
        tx.preconditioner(optax.sgd(0.1).init(PARAMS))
    with pytest.raises(ValueError, match="unknown"):
        tx.preconditioner(_run(optax.adam(0.1))[1], decay=0.9)
    with pytest.raises(ValueError, match="no step"):
        tx.preconditioner(optax.adam(0.1).init(PARAMS))
    two = (optax.adam(0.1).init(PARAMS), optax.rmsprop(0.1).init(PARAMS))
    with pytest.raises(ValueError, match="several"):
        tx.preconditioner(two)
    _, state = _run(optax.chain(scale_by_shampoo(block_size=2), optax.scale(-0.1)))
    with pytest.raises(ValueError, match="block_size"):
        tx.preconditioner(state)
    assert callable(tx.preconditioner(state, block_size=2))


@pytest.mark.timeout(120)
def test_full_batch_adam_settles_at_the_adaptive_edge_of_stability():
    """Cohen et al. 2022: on a quadratic, full-batch Adam's λ₁(P⁻¹H) rises to and hovers
    at (2 + 2β₁)/((1 − β₁)η) = 38/η for β₁ = 0.9 (measured here: 37.6/η over the last
    quarter of 20 000 steps)."""
    d, eta, b1, steps, stride = 20, 0.01, 0.9, 20_000, 10
    k1, k2 = jax.random.split(jax.random.key(0))
    q, _ = jnp.linalg.qr(jax.random.normal(k1, (d, d)))
    A = (q * jnp.logspace(-1, 1, d)) @ q.T
    w0 = jax.random.normal(k2, (d,))
    opt = optax.adam(eta, b1=b1, b2=0.999)

    def step(carry, _):
        w, s = carry
        u, s = opt.update(A @ w, s, w)
        return (w + u, s), None

    def every(carry, _):  # the sharpness every `stride` steps keeps the test quick
        w, s = jax.lax.scan(step, carry, None, length=stride)[0]
        p = tx.preconditioner(s)
        return (w, s), jnp.linalg.eigvalsh(A / jnp.sqrt(jnp.outer(p, p)))[-1]

    (w, s), sharp = jax.jit(lambda w: jax.lax.scan(every, (w, opt.init(w)), None,
                                                   length=steps // stride))(w0)
    sharp = np.asarray(sharp)
    threshold = (2 + 2 * b1) / ((1 - b1) * eta)
    assert sharp[:100].max() < 0.5 * threshold   # it starts well below the edge
    np.testing.assert_allclose(sharp[-len(sharp) // 4:].mean(), threshold, rtol=0.05)
    # The same value from ls.preconditioned on the final state.
    op = ls.preconditioned(ls.LinearOperator(lambda v: A @ v, w), tx.preconditioner(s))
    np.testing.assert_allclose(np.linalg.eigvalsh(op.dense())[-1], sharp[-1], rtol=1e-8)


def test_preconditioned_lambda_max_matches_dense_under_jit_and_vmap():
    opt = optax.adam(0.05, b2=0.9)

    def train(seed):
        p = jax.tree.map(lambda x: x + 0.1 * seed, PARAMS)
        s = opt.init(p)
        for _ in range(3):
            u, s = opt.update(jax.grad(_loss)(p, BATCH), s, p)
            p = optax.apply_updates(p, u)
        return p, s

    members = [train(seed) for seed in (0, 1)]
    want = []
    for p, s in members:
        flat, unravel = jax.flatten_util.ravel_pytree(p)
        dense = np.asarray(jax.hessian(lambda f: _loss(unravel(f), BATCH))(flat))
        d = np.asarray(jax.flatten_util.ravel_pytree(tx.preconditioner(s, b2=0.9))[0])
        want.append(np.linalg.eigvalsh(dense / np.sqrt(np.outer(d, d)))[-1])

    def lam(p, s):
        return tx.preconditioned_lambda_max(_loss, p, BATCH, s, key=jax.random.key(0),
                                            num_steps=15, b2=0.9)

    stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
    got = jax.jit(jax.vmap(lam))(*stacked)
    np.testing.assert_allclose(got, want, rtol=1e-8)


def test_grafted_shampoo_direction_and_jit():
    # With the Adam graft, a matrix's step is P⁻¹g rescaled to the graft's norm (same
    # direction), and a vector's step is the graft itself, √v̂ + graft_eps.
    opt = optax.chain(scale_by_shampoo(b1=0.0, b2=0.9, eps=1e-2, graft_eps=1e-3,
                                       start_preconditioning_step=0, precondition_every=1),
                      optax.scale(-0.1))
    updates, state = _run(opt)
    P = jax.jit(lambda s: tx.preconditioner(s, b2=0.9, graft_eps=1e-3))(state)
    assert isinstance(P, tx.KroneckerPreconditioner)
    want = _apply_inverse(P, GRADS[2])
    np.testing.assert_allclose(-np.asarray(updates["b"]) / 0.1, want["b"], rtol=1e-8)
    got, ref = np.ravel(updates["w"]), np.ravel(want["w"])
    cosine = -got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref))
    np.testing.assert_allclose(cosine, 1.0, rtol=1e-10)
