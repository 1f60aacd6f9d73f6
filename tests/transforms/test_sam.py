"""SAM / ASAM / GSAM against optax.contrib.sam and the papers' algorithms written plainly."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import transforms as tx
from tests.landscape.models import ce_loss, classification_data, mlp_params

A = np.array([[3.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.3]])
B = np.array([1.0, -2.0, 0.5])
W0 = np.array([0.7, -0.3, 1.1])
DUMMY = jnp.zeros((1,))


def quad_loss(w, batch):
    del batch
    return 0.5 * w @ jnp.asarray(A) @ w - jnp.asarray(B) @ w


def quad_grad(w):
    return A @ w - B


def run(opt, loss_fn, params, batch, steps):
    state = opt.init(params)
    step = jax.jit(functools.partial(tx.train_step, opt, loss_fn))
    out = []
    for t in range(steps):
        params, state, _ = step(params, state, batch, jax.random.key(t))
        out.append(params)
    return out


@pytest.fixture(scope="module")
def mlp():
    return mlp_params(jax.random.key(0)), classification_data(jax.random.key(1))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sam_equals_optax_contrib_sam_opaque(mlp, momentum):
    params, batch = mlp
    lr, rho = 0.1, 0.05
    ours = run(tx.make("sam", learning_rate=lr, rho=rho, momentum=momentum),
               ce_loss, params, batch, 6)
    outer = optax.sgd(lr, momentum=momentum or None)
    ref = optax.contrib.sam(outer, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
                            sync_period=2, opaque_mode=True)
    grad = jax.grad(ce_loss)

    @jax.jit
    def ref_step(p, state):
        updates, state = ref.update(grad(p, batch), state, p,
                                    grad_fn=lambda q, _: grad(q, batch))
        return optax.apply_updates(p, updates), state

    p, state = params, ref.init(params)
    for t in range(6):
        p, state = ref_step(p, state)
        for a, b in zip(jax.tree.leaves(ours[t]), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_sam_equals_algorithm_1_on_quadratic():
    lr, rho = 0.2, 0.1
    ours = run(tx.sam(lr, rho=rho), quad_loss, jnp.asarray(W0), DUMMY, 8)
    w = W0.copy()
    for t in range(8):
        g = quad_grad(w)
        eps = rho * g / np.linalg.norm(g)        # ε̂(w) = ρ ∇L / ‖∇L‖₂
        w = w - lr * quad_grad(w + eps)          # w ← w − η ∇L(w + ε̂)
        np.testing.assert_allclose(ours[t], w, rtol=1e-12, atol=1e-12)


def test_asam_matches_plain_formula_on_quadratic():
    lr, rho, eta = 0.2, 0.3, 0.01
    ours = run(tx.make("asam", learning_rate=lr, rho=rho, eta=eta), quad_loss,
               jnp.asarray(W0), DUMMY, 6)
    w = W0.copy()
    for t in range(6):
        g = quad_grad(w)
        t_w = np.abs(w) + eta
        eps = rho * t_w**2 * g / np.linalg.norm(t_w * g)
        w = w - lr * quad_grad(w + eps)
        np.testing.assert_allclose(ours[t], w, rtol=1e-12, atol=1e-12)


def test_asam_with_large_eta_is_sam_with_scaled_radius(mlp):
    params, batch = mlp
    eta, rho = 1e8, 0.05
    a = run(tx.make("asam", learning_rate=0.1, rho=rho / eta, eta=eta), ce_loss,
            params, batch, 4)
    s = run(tx.make("sam", learning_rate=0.1, rho=rho), ce_loss, params, batch, 4)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(s)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


def test_asam_mask_leaves_masked_leaves_unscaled():
    w = {"a": jnp.array([2.0, -1.0]), "b": jnp.array([0.5])}
    g = {"a": jnp.array([0.3, 0.4]), "b": jnp.array([-1.0])}
    d, _ = tx.asam_ascent(0.1, mask={"a": True, "b": False}).update(g, None, w)
    t = {"a": np.abs(np.asarray(w["a"])) + 0.1, "b": np.ones(1)}
    tg = np.concatenate([t["a"] * g["a"], t["b"] * g["b"]])
    np.testing.assert_allclose(d["a"], t["a"] ** 2 * g["a"] / np.linalg.norm(tg), rtol=1e-12)
    np.testing.assert_allclose(d["b"], g["b"] / np.linalg.norm(tg), rtol=1e-12)


@pytest.mark.parametrize("alpha", [0.0, jnp.asarray(0.0)])  # literal and traced paths
def test_gsam_with_alpha_zero_equals_sam(mlp, alpha):
    params, batch = mlp
    g = run(tx.make("gsam", learning_rate=0.1, rho=0.05, alpha=alpha), ce_loss,
            params, batch, 4)
    s = run(tx.make("sam", learning_rate=0.1, rho=0.05), ce_loss, params, batch, 4)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(s)):
        np.testing.assert_allclose(x, y, atol=1e-12, rtol=0)


def test_gsam_matches_plain_formula_on_quadratic():
    lr, rho, alpha = 0.2, 0.1, 0.4
    ours = run(tx.gsam(lr, rho=rho, alpha=alpha), quad_loss, jnp.asarray(W0), DUMMY, 6)
    w = W0.copy()
    for t in range(6):
        g = quad_grad(w)
        g_p = quad_grad(w + rho * g / np.linalg.norm(g))
        g_perp = g - (g @ g_p) / (g_p @ g_p) * g_p     # g = g_∥ + g_⊥, g_∥ along g_p
        w = w - lr * (g_p - alpha * g_perp)
        np.testing.assert_allclose(ours[t], w, rtol=1e-12, atol=1e-12)


def test_rho_schedule_is_read_at_each_step():
    rhos = [0.1, 0.0, 0.3]
    sched = lambda t: jnp.asarray(rhos)[t]  # noqa: E731
    ours = run(tx.sam(0.2, rho=sched), quad_loss, jnp.asarray(W0), DUMMY, 3)
    w = W0.copy()
    for t in range(3):
        g = quad_grad(w)
        w = w - 0.2 * quad_grad(w + rhos[t] * g / np.linalg.norm(g))
        np.testing.assert_allclose(ours[t], w, rtol=1e-12)


def _per_chunk_sam_grad(params, batch, rho, k):
    """m-sharpness written plainly: each chunk perturbs with its own gradient."""
    n = batch[0].shape[0] // k
    grad = jax.jit(jax.grad(ce_loss))
    grads = []
    for c in range(k):
        chunk = (batch[0][c * n:(c + 1) * n], batch[1][c * n:(c + 1) * n])
        g = jax.tree.map(np.asarray, grad(params, chunk))
        norm = np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(g)))
        moved = jax.tree.map(lambda p, x: np.asarray(p) + rho * x / norm, params, g)
        grads.append(jax.tree.map(np.asarray, grad(moved, chunk)))
    return jax.tree.map(lambda *x: sum(x) / k, *grads)


def test_m_sharpness_over_chunks_and_over_named_axis(mlp):
    params, _ = mlp
    x, y = classification_data(jax.random.key(5), n=32)
    batch, lr, rho, k = (x, y), 0.1, 0.05, 4
    expected = jax.tree.map(lambda p, g: p - lr * g, params,
                            _per_chunk_sam_grad(params, batch, rho, k))
    opt = tx.make("sam", learning_rate=lr, rho=rho, num_chunks=k)
    chunked, _, _ = jax.jit(functools.partial(tx.train_step, opt, ce_loss))(
        params, opt.init(params), batch, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-12)

    # The same m-sharpness with each member of a named axis holding one chunk.
    opt = tx.sam(lr, rho=rho, batch_axis_name="data")
    shards = jax.tree.map(lambda a: a.reshape((k, -1) + a.shape[1:]), batch)
    step = functools.partial(tx.train_step, opt, ce_loss)
    member = jax.vmap(step, in_axes=(None, None, 0, None), axis_name="data")(
        params, opt.init(params), shards, jax.random.key(0)).params
    for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, np.broadcast_to(b, a.shape), atol=1e-12)


def test_sharpness_aware_chains_with_any_optimizer(mlp):
    params, batch = mlp
    opt = optax.chain(tx.sharpness_aware(0.05), optax.adam(1e-2))
    ref = optax.adam(1e-2)
    got = jax.jit(functools.partial(tx.train_step, opt, ce_loss))(
        params, opt.init(params), batch, jax.random.key(0))

    @jax.jit
    def by_hand(params):  # the SAM gradient, then Adam
        g = jax.grad(ce_loss)(params, batch)
        norm = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
        moved = jax.tree.map(lambda p, x: p + 0.05 * x / norm, params, g)
        upd, _ = ref.update(jax.grad(ce_loss)(moved, batch), ref.init(params), params)
        return optax.apply_updates(params, upd)

    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(by_hand(params))):
        np.testing.assert_allclose(a, b, atol=1e-10)


def test_sam_errors(mlp):
    params, batch = mlp
    opt = tx.sam(0.1)
    g = jax.grad(ce_loss)(params, batch)
    with pytest.raises(ValueError, match="grad_fn"):
        opt.update(g, opt.init(params), params)
    opt = tx.make("sam", learning_rate=0.1, num_chunks=5)
    with pytest.raises(ValueError, match="num_chunks"):
        tx.train_step(opt, ce_loss, params, opt.init(params), batch, jax.random.key(0))
    with pytest.raises(ValueError, match="num_chunks"):
        tx.sharpness_aware(0.05, num_chunks=0)
