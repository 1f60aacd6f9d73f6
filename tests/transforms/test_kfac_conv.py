"""K-FAC for convolutions (KFC, Grosse & Martens 2016) against factors written plainly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import landscape as ls
import transforms as tx
from transforms.kfac import find_dense_layers, kfac_statistics, scale_by_kfac

CIN, COUT, K = 2, 3, 3


def conv1d(params, x):
    """A 1-D convolution (NWC, kernel WIO, stride 1, padding 1) plus bias."""
    out = jax.lax.conv_general_dilated(x, params["w"], (1,), ((1, 1),),
                                       dimension_numbers=("NWC", "WIO", "NWC"))
    return out + params["b"]


def conv_params(seed=0, k=K):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"b": 0.1 * jax.random.normal(k1, (COUT,)),
            "w": jax.random.normal(k2, (k, CIN, COUT))}


def plain_patches(x, k, pad):
    """Rows [x[t - pad + j, c] for c in channels for j in offsets] + [1], by loops."""
    n, length, c = x.shape
    x = np.asarray(x)
    rows = []
    for i in range(n):
        for t in range(length + 2 * pad - k + 1):
            row = [x[i, t - pad + j, ch] if 0 <= t - pad + j < length else 0.0
                   for ch in range(c) for j in range(k)]
            rows.append(row + [1.0])
    return np.asarray(rows)


def test_kfc_factors_equal_a_plain_computation():
    params = conv_params()
    n, length = 3, 6
    x = jax.random.normal(jax.random.key(1), (n, length, CIN))
    readout = jax.random.normal(jax.random.key(2), (length * COUT, 4))
    y = jnp.asarray([0, 3, 1])

    def apply(p, x):   # the conv is the only layer: the readout is a constant
        return jnp.tanh(conv1d(p, x)).reshape(x.shape[0], -1) @ readout

    (layer,) = find_dense_layers(apply, params, x)
    assert (layer.fan_in, layer.fan_out, layer.kernel_axes) == (CIN * K, COUT, (1, 0, 2))
    stats = kfac_statistics(apply, params, x, targets=y)

    # Ω = mean over examples and positions of ã ãᵀ; Γ = Σ_t g_t g_tᵀ averaged over
    # examples, g_t = ∂ℓ_n/∂s_t of the example's own loss at its pre-activations.
    a = plain_patches(x, K, 1)
    s = conv1d(params, x)

    def example_loss(s_n, y_n):
        logits = jnp.tanh(s_n).reshape(-1) @ readout
        return -jax.nn.log_softmax(logits)[y_n]

    g = np.asarray(jax.vmap(jax.grad(example_loss))(s, y)).reshape(-1, COUT)
    np.testing.assert_allclose(stats.activations[0], a.T @ a / a.shape[0], rtol=1e-12)
    np.testing.assert_allclose(stats.gradients[0], g.T @ g / n, rtol=1e-12, atol=1e-15)


def test_one_position_kfc_is_the_exact_fisher():
    # One example and a kernel covering the whole (2-D) input: one output position, so
    # the per-example gradient is vec(ã gᵀ) and the Fisher is exactly Ω ⊗ Γ.
    h, w = 3, 2
    k1, k2 = jax.random.split(jax.random.key(4))
    params = {"b": 0.1 * jax.random.normal(k1, (COUT,)),
              "w": jax.random.normal(k2, (h, w, CIN, COUT))}

    def apply(p, x):
        out = jax.lax.conv_general_dilated(x, p["w"], (1, 1), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return (out + p["b"]).reshape(x.shape[0], COUT)

    x = jax.random.normal(jax.random.key(5), (1, h, w, CIN))
    y = jnp.asarray([1])
    stats = kfac_statistics(apply, params, x, targets=y)
    kron = np.kron(np.asarray(stats.activations[0]), np.asarray(stats.gradients[0]))
    # KFC's row (c, i, j) of the (patch, out) matrix, column o, is kernel[i, j, c, o];
    # ravel_pytree orders the bias first, then the kernel row-major.
    perm = np.empty(COUT + h * w * CIN * COUT, int)
    perm[:COUT] = CIN * h * w * COUT + np.arange(COUT)
    for i in range(h):
        for j in range(w):
            for c in range(CIN):
                for o in range(COUT):
                    flat = ((i * w + j) * CIN + c) * COUT + o
                    perm[COUT + flat] = ((c * h + i) * w + j) * COUT + o
    want = np.asarray(ls.fisher(apply, params, (x, y), kind="empirical").dense())
    np.testing.assert_allclose(kron[np.ix_(perm, perm)], want, rtol=1e-10, atol=1e-13)


def test_conv_direction_is_the_damped_solve_on_the_kernel_matrix():
    params = conv_params(k=2)
    x = jax.random.normal(jax.random.key(1), (4, 5, CIN))
    apply = lambda p, x: conv1d(p, x).mean(axis=1)  # noqa: E731
    layers = find_dense_layers(apply, params, x)
    stats = kfac_statistics(apply, params, x, key=jax.random.key(3))
    grads = {"b": jnp.arange(COUT, dtype=float),
             "w": jax.random.normal(jax.random.key(6), params["w"].shape)}
    lam = 1e-2
    opt = scale_by_kfac(layers, damping=lam, inverse_every=1)
    d, _ = opt.update(grads, opt.init(params), statistics=stats)
    a, g = np.asarray(stats.activations[0]), np.asarray(stats.gradients[0])
    # kernel (k, c, o) -> rows (c, k), plus the bias row
    xg = np.concatenate([np.transpose(grads["w"], (1, 0, 2)).reshape(-1, COUT),
                         grads["b"][None]], axis=0)
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    want = (np.linalg.inv(a + pi * np.sqrt(lam) * np.eye(a.shape[0])) @ xg
            @ np.linalg.inv(g + np.sqrt(lam) / pi * np.eye(COUT)))
    np.testing.assert_allclose(d["b"], want[-1], rtol=1e-9)
    np.testing.assert_allclose(d["w"], np.transpose(want[:-1].reshape(CIN, 2, COUT),
                                                    (1, 0, 2)), rtol=1e-9)


class _ConvNet(nnx.Module):
    def __init__(self, rngs):
        self.c1 = nnx.Conv(1, 4, (3,), rngs=rngs)
        self.c2 = nnx.Conv(4, 4, (3,), strides=2, rngs=rngs)
        self.head = nnx.Linear(4 * 4, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c2(jax.nn.relu(self.c1(x[..., None]))))
        return self.head(h.reshape(x.shape[0], -1))


@pytest.mark.timeout(120)
def test_nnx_conv_net_preconditions_every_layer_and_trains():
    graphdef, params = nnx.split(_ConvNet(nnx.Rngs(0)), nnx.Param)
    apply = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = (x[:, :3].sum(1) > 0).astype(jnp.int32) + (x[:, 5] > 1).astype(jnp.int32)
    layers = find_dense_layers(apply, params, x[:1])
    assert [layer.kernel_axes is not None for layer in layers] == [True, True, False]
    assert all(layer.bias is not None for layer in layers)

    def loss(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, batch[0]),
                                                               batch[1]).mean()

    opt = tx.make("kfac", learning_rate=0.3, layers=layers, damping=1e-2, inverse_every=2)

    @jax.jit
    def run(p):
        def body(carry, t):
            p, s = carry
            p, s, _ = tx.train_step(opt, loss, p, s, (x, y), jax.random.key(t),
                                    apply_fn=apply, step=t)
            return (p, s), None
        (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), jnp.arange(30))
        return p

    assert float(loss(run(params), (x, y))) < 0.5 * float(loss(params, (x, y)))
