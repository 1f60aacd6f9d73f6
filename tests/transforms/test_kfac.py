"""K-FAC against explicit Fisher computations, dense natural gradients, NNX, the ravine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape.models import classification_data, mlp_apply, mlp_params
from tests.transforms import _second_order_ravine as ravine
from transforms import _second_order_blocks as blocks
from transforms.kfac import (DenseLayer, KFACState, KFACStatistics, find_dense_layers,
                             kfac, kfac_statistics, scale_by_kfac)


def linear_apply(params, x):
    return x @ params["w"] + params["b"]


def linear_params(d=4, c=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"b": 0.3 * jax.random.normal(k1, (c,)), "w": jax.random.normal(k2, (d, c))}


def kron_in_ravel_order(a, g, d, c):
    """A ⊗ G (rows of [W; b] in row-major order) permuted to ravel_pytree's (b, w)."""
    k = np.kron(np.asarray(a), np.asarray(g))
    perm = np.concatenate([c + np.arange(d * c), np.arange(c)])
    out = np.zeros_like(k)
    out[np.ix_(perm, perm)] = k
    return out


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_single_linear_softmax_example_is_exactly_kronecker():
    d, c = 4, 3
    params = linear_params(d, c)
    x, y = jax.random.normal(jax.random.key(1), (1, d)), jnp.asarray([2])
    stats = kfac_statistics(linear_apply, params, x, targets=y)
    want = ls.fisher(linear_apply, params, (x, y), kind="empirical").dense()
    got = kron_in_ravel_order(stats.activations[0], stats.gradients[0], d, c)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_sampled_labels_give_the_expected_fisher_of_one_example():
    d, c = 4, 3
    params = linear_params(d, c)
    x = 0.3 * jax.random.normal(jax.random.key(1), (1, d))  # no class near p = 1
    stats = kfac_statistics(linear_apply, params, x, key=jax.random.key(3),
                            num_samples=4000)
    want = np.asarray(ls.ggn(linear_apply, params, (x, jnp.asarray([0]))).dense())
    got = kron_in_ravel_order(stats.activations[0], stats.gradients[0], d, c)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_factors_match_an_explicit_computation():
    d, c, n, s = 4, 3, 10, 5
    params = linear_params(d, c)
    x = jax.random.normal(jax.random.key(1), (n, d))
    key = jax.random.key(7)
    stats = jax.jit(lambda p, x: kfac_statistics(linear_apply, p, x, key=key,
                                                 num_samples=s))(params, x)
    # the documented draw: jax.random.categorical of the logits, one key per sample
    logits = np.asarray(x @ params["w"] + params["b"])
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    a = np.concatenate([np.asarray(x), np.ones((n, 1))], axis=1)
    g_sum = np.zeros((c, c))
    for k in jax.random.split(key, s):
        labels = np.asarray(jax.random.categorical(k, jnp.asarray(logits), axis=-1))
        g = probs - np.eye(c)[labels]
        g_sum += g.T @ g
    np.testing.assert_allclose(stats.activations[0], a.T @ a / n, rtol=1e-12)
    np.testing.assert_allclose(stats.gradients[0], g_sum / (n * s), rtol=1e-12)


@pytest.mark.parametrize("tikhonov", ["exact", "factored"])
def test_direction_is_the_damped_kronecker_solve(tikhonov):
    params = mlp_params(jax.random.key(0), (4, 5, 3))
    x, y = classification_data(jax.random.key(1), n=20, d=4, classes=3)
    layers = find_dense_layers(mlp_apply, params, x)
    stats = jax.jit(lambda p: kfac_statistics(mlp_apply, p, x, key=jax.random.key(2)))(params)
    grads = jax.grad(lambda p: ls.cross_entropy(mlp_apply(p, x), y))(params)
    lam = 1e-2
    opt = scale_by_kfac(layers, damping=lam, inverse_every=1, tikhonov=tikhonov)
    d, state = jax.jit(opt.update)(grads, opt.init(params), statistics=stats)
    assert isinstance(state, KFACState)
    for i, name in enumerate(sorted(params)):
        a, g = np.asarray(stats.activations[i]), np.asarray(stats.gradients[i])
        xg = np.concatenate([grads[name]["w"], grads[name]["b"][None]], axis=0)
        if tikhonov == "exact":
            k = np.kron(a, g) + lam * np.eye(a.shape[0] * g.shape[0])
            want = np.linalg.solve(k, xg.reshape(-1)).reshape(xg.shape)
        else:
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            want = (np.linalg.inv(a + pi * np.sqrt(lam) * np.eye(a.shape[0])) @ xg
                    @ np.linalg.inv(g + np.sqrt(lam) / pi * np.eye(g.shape[0])))
        np.testing.assert_allclose(d[name]["w"], want[:-1], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(d[name]["b"], want[-1], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("tikhonov", ["exact", "factored"])
def test_factors_are_averaged_then_decayed_and_inverses_refreshed_on_schedule(tikhonov):
    params = linear_params()
    layers = find_dense_layers(linear_apply, params, jnp.zeros((1, 4)))
    lam = 1e-2
    opt = scale_by_kfac(layers, decay=0.6, inverse_every=2, damping=lam, tikhonov=tikhonov)
    state, update = opt.init(params), jax.jit(opt.update)
    stats_fn = jax.jit(lambda x, k: kfac_statistics(linear_apply, params, x, key=k))
    xs = [jax.random.normal(jax.random.key(i), (6, 4)) for i in range(4)]
    a_run = g_run = None
    for t, x in enumerate(xs):
        stats = stats_fn(x, jax.random.key(10 + t))
        _, state = update(params, state, statistics=stats)
        w = max(1 - 0.6, 1 / (t + 1))
        a_new, g_new = np.asarray(stats.activations[0]), np.asarray(stats.gradients[0])
        a_run = a_new if a_run is None else (1 - w) * a_run + w * a_new
        g_run = g_new if g_run is None else (1 - w) * g_run + w * g_new
        np.testing.assert_allclose(state.activations[0], a_run, rtol=1e-12)
        if t % 2 == 0:
            a_at, g_at = a_run, g_run
        assert int(state.refreshes) == t // 2 + 1
        if tikhonov == "exact":
            vecs, vals = state.activation_eigvecs[0], state.activation_eigvals[0]
            np.testing.assert_allclose((vecs * vals) @ vecs.T, a_at, atol=1e-10)
        else:
            pi = np.sqrt((np.trace(a_at) / 5) / (np.trace(g_at) / 3))
            want_a = np.linalg.inv(a_at + pi * np.sqrt(lam) * np.eye(5))
            want_g = np.linalg.inv(g_at + np.sqrt(lam) / pi * np.eye(3))
            np.testing.assert_allclose(state.activation_inverses[0], want_a, rtol=1e-9)
            np.testing.assert_allclose(state.gradient_inverses[0], want_g, rtol=1e-9)


def test_cosine_with_exact_natural_gradient_on_a_tiny_mlp():
    # tanh MLP 5-8-3 near initialisation (LeCun-normal weights scaled by 0.3)
    params = jax.tree.map(lambda a: 0.3 * a, mlp_params(jax.random.key(0), (5, 8, 3)))
    x, y = classification_data(jax.random.key(1), n=256, d=5, classes=3)
    layers = find_dense_layers(mlp_apply, params, x)
    fisher = np.asarray(ls.ggn(mlp_apply, params, (x, y)).dense())  # E over labels
    grads = jax.grad(lambda p: ls.cross_entropy(mlp_apply(p, x), y))(params)
    flat_g = np.asarray(ravel_pytree(grads)[0])
    stats = jax.jit(lambda p: kfac_statistics(mlp_apply, p, x, key=jax.random.key(2),
                                              num_samples=256))(params)
    lam_max = np.linalg.eigvalsh(fisher)[-1]
    cos = {}
    for rel in (0.1, 0.01):
        lam = rel * lam_max
        natural = np.linalg.solve(fisher + lam * np.eye(len(flat_g)), flat_g)
        opt = scale_by_kfac(layers, damping=lam, inverse_every=1, tikhonov="exact")
        d, _ = jax.jit(opt.update)(grads, opt.init(params), statistics=stats)
        cos[rel] = cosine(np.asarray(ravel_pytree(d)[0]), natural), cosine(flat_g, natural)
    assert cos[0.1][0] >= 0.9, cos          # measured 0.97 (the gradient: 0.91)
    assert cos[0.01][0] > cos[0.01][1] + 0.15, cos   # measured 0.84 against 0.57


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(5, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.hidden(x)))


def test_flax_nnx_mlp_written_the_ordinary_way():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    x, y = classification_data(jax.random.key(1), n=64, d=5, classes=3)
    layers = find_dense_layers(apply_fn, params, x[:1])
    assert [(layer.fan_in, layer.fan_out, layer.bias is not None) for layer in layers] \
        == [(5, 16, True), (16, 3, True)]
    assert "hidden" in layers[0].name and "kernel" in layers[0].name

    # the same network as a plain function of plain arrays gives the same factors
    plain = {"hidden": {"w": params["hidden"]["kernel"][...], "b": params["hidden"]["bias"][...]},
             "out": {"w": params["out"]["kernel"][...], "b": params["out"]["bias"][...]}}

    def plain_apply(p, x):
        h = jax.nn.relu(x @ p["hidden"]["w"] + p["hidden"]["b"])
        return h @ p["out"]["w"] + p["out"]["b"]

    s1 = jax.jit(lambda p: kfac_statistics(apply_fn, p, x, key=jax.random.key(3)))(params)
    s2 = jax.jit(lambda p: kfac_statistics(plain_apply, p, x, key=jax.random.key(3)))(plain)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-12)

    def loss_fn(p):
        return ls.cross_entropy(apply_fn(p, x), y)

    opt = kfac(0.3, layers, damping=1e-2, inverse_every=5)

    @jax.jit
    def step(p, s, key):
        g = jax.grad(loss_fn)(p)
        stats = kfac_statistics(apply_fn, p, x, key=key)
        u, s = opt.update(g, s, p, statistics=stats)
        return optax.apply_updates(p, u), s

    p, s = params, opt.init(params)
    loss0 = loss_fn(p)
    for i in range(20):
        p, s = step(p, s, jax.random.key(100 + i))
    assert loss_fn(p) < 0.5 * loss0


def test_transposed_kernel_and_shared_weights():
    x = jax.random.normal(jax.random.key(1), (8, 4))
    w = jax.random.normal(jax.random.key(2), (4, 3))
    p_in_out = {"b": jnp.zeros(3), "w": w}
    p_out_in = {"b": jnp.zeros(3), "w": w.T}
    (layer,) = find_dense_layers(lambda p, x: x @ p["w"].T + p["b"], p_out_in, x)
    assert layer.transposed and (layer.fan_in, layer.fan_out) == (4, 3)
    s1 = kfac_statistics(linear_apply, p_in_out, x, key=jax.random.key(0))
    s2 = kfac_statistics(lambda p, x: x @ p["w"].T + p["b"], p_out_in, x,
                         key=jax.random.key(0))
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    g = {"b": jnp.ones(3), "w": jnp.arange(12.0).reshape(4, 3)}
    o1 = scale_by_kfac(find_dense_layers(linear_apply, p_in_out, x), inverse_every=1)
    o2 = scale_by_kfac((layer,), inverse_every=1)
    d1, _ = jax.jit(o1.update)(g, o1.init(p_in_out), statistics=s1)
    d2, _ = jax.jit(o2.update)({"b": g["b"], "w": g["w"].T}, o2.init(p_out_in), statistics=s2)
    np.testing.assert_allclose(d1["w"], d2["w"].T, rtol=1e-12)

    def shared(p, x):   # one kernel used twice: not a K-FAC layer
        return (x @ p["w"]) @ p["w"].T @ p["v"]

    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 2))}
    (only,) = find_dense_layers(shared, params, x)
    assert only.name == "['v']"


def test_no_dense_layer_and_bad_arguments_raise():
    params = {"s": jnp.ones(3)}
    with pytest.raises(ValueError, match="dense layer"):
        find_dense_layers(lambda p, x: x * p["s"], params, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="key"):
        kfac_statistics(linear_apply, linear_params(), jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="loss"):
        kfac_statistics(linear_apply, linear_params(), jnp.ones((2, 4)),
                        key=jax.random.key(0), loss="hinge")
    with pytest.raises(ValueError, match="num_samples"):
        kfac_statistics(linear_apply, linear_params(), jnp.ones((2, 4)),
                        key=jax.random.key(0), num_samples=0)
    with pytest.raises(ValueError, match="layers"):
        scale_by_kfac(())
    layers = find_dense_layers(linear_apply, linear_params(), jnp.ones((1, 4)))
    for kwargs, name in [(dict(damping=0.0), "damping"), (dict(decay=1.0), "decay"),
                         (dict(inverse_every=0), "inverse_every"),
                         (dict(momentum=-0.5), "momentum"),
                         (dict(tikhonov="none"), "tikhonov")]:
        with pytest.raises(ValueError, match=name):
            scale_by_kfac(layers, **kwargs)
    opt = scale_by_kfac(layers)
    state = opt.init(linear_params())
    with pytest.raises(ValueError, match="statistics"):
        opt.update(linear_params(), state)
    bad = KFACStatistics((jnp.eye(3),), (jnp.eye(3),))
    with pytest.raises(ValueError, match="statistics"):
        opt.update(linear_params(), state, statistics=bad)
    with pytest.raises(ValueError, match="layers"):
        opt.init({"b": jnp.zeros(3), "w": jnp.zeros((5, 3))})


def test_failed_eigh_falls_back_and_never_emits_nan(monkeypatch):
    params = linear_params()
    x = jax.random.normal(jax.random.key(1), (8, 4))
    layers = find_dense_layers(linear_apply, params, x)
    stats = kfac_statistics(linear_apply, params, x, key=jax.random.key(0))
    monkeypatch.setattr(blocks, "_eigh", lambda m: (jnp.full(m.shape[:-1], jnp.nan),
                                                    jnp.full(m.shape, jnp.nan)))
    lam = 1e-2
    opt = scale_by_kfac(layers, damping=lam, inverse_every=1, tikhonov="exact")
    d, state = jax.jit(opt.update)(params, opt.init(params), statistics=stats)
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(d))
    # the initial decomposition (identity, unit eigenvalues) is kept: d = g / (1 + λ)
    for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b / (1 + lam), rtol=1e-12)
    np.testing.assert_array_equal(state.activation_eigvecs[0], np.eye(5))


def test_vmap_over_learning_rate_matches_loop():
    x, y, params = ravine.problem()
    layers = find_dense_layers(ravine.apply_fn, params, x)

    def run(lr):
        opt = kfac(lr, layers, damping=1e-3, inverse_every=2, momentum=0.5)
        p, s = params, opt.init(params)
        for t in range(3):
            g = jax.grad(ravine.loss_fn)(p, (x, y))
            stats = kfac_statistics(ravine.apply_fn, p, x, key=jax.random.key(t), loss="mse")
            u, s = opt.update(g, s, p, statistics=stats)
            p = optax.apply_updates(p, u)
        return p

    lrs = jnp.asarray([0.1, 0.5])
    batched = jax.jit(jax.vmap(run))(lrs)
    for i, lr in enumerate(lrs):
        np.testing.assert_allclose(batched["w"][i], jax.jit(run)(lr)["w"], rtol=1e-10)


def test_ravine_far_fewer_steps_than_tuned_sgd_and_adam():
    sgd, adam = ravine.baselines(num_steps=4000)
    x, _, params = ravine.problem()
    layers = find_dense_layers(ravine.apply_fn, params, x)

    def extra(p, x):
        return {"statistics": kfac_statistics(ravine.apply_fn, p, x, loss="mse",
                                              key=jax.random.key(0))}

    ours = min(int(ravine.steps_to_target(kfac(lr, layers, damping=1e-6, inverse_every=1),
                                          200, extra)) for lr in (0.5, 1.0))
    assert ours <= 200, ours
    assert ours < 0.1 * min(sgd, adam), (ours, sgd, adam)


def test_dense_layer_is_a_named_tuple_of_static_fields():
    layer = find_dense_layers(linear_apply, linear_params(), jnp.ones((1, 4)))[0]
    assert layer == DenseLayer("['w']", 1, 0, False, 4, 3)
