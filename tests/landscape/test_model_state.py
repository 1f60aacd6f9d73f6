"""Curvature of models with state (BatchNorm) and of the transformer against dense
references written plainly (float64).

Each reference is the model's function written out in jax.numpy from the parameter
dict (`lax.conv_general_dilated`, batch statistics by `mean`/`var`, attention by
`einsum`), differentiated twice by `jax.hessian`; Basin's side goes through the NNX
model, `experiments.models.pure` and `ls.hessian`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import landscape as ls
from experiments.models import CNN1D, Transformer1D, batch_stats, pure

EPS_BN, EPS_LN = 1e-5, 1e-6


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _conv(z, kernel, stride):
    return jax.lax.conv_general_dilated(z, kernel, (stride,), "SAME",
                                        dimension_numbers=("NWC", "WIO", "NWC"))


def plain_bn_cnn(params, x, stats=None):
    """conv -> BatchNorm -> relu, twice; mean over positions; linear head. `stats=None`
    normalizes with the batch's own mean and (biased) variance over examples and
    positions; otherwise with the given running statistics."""
    h = x[..., None]
    for i in range(2):
        h = _conv(h, params["convs"][i]["kernel"], 1 if i == 0 else 2)
        if stats is None:
            mean, var = h.mean((0, 1)), h.var((0, 1))
        else:
            mean, var = stats["norms"][i]["mean"], stats["norms"][i]["var"]
        norm = params["norms"][i]
        h = jax.nn.relu((h - mean) / jnp.sqrt(var + EPS_BN) * norm["scale"] + norm["bias"])
    return h.mean(1) @ params["head"]["kernel"] + params["head"]["bias"]


@pytest.fixture(scope="module")
def bn_setup():
    model = CNN1D(3, channels=(3, 4), kernel_size=3, batch_norm=True, rngs=nnx.Rngs(0))
    key = jax.random.key(1)
    _, params = pure(model, "train")
    # Move away from the initialization (scale 1, bias 0) so every term is generic.
    flat, unravel = ravel_pytree(_f64(params))
    params = unravel(flat + 0.3 * jax.random.normal(key, flat.shape))
    x = jax.random.normal(jax.random.key(2), (12, 8)) + 0.5
    y = jax.random.randint(jax.random.key(3), (12,), 0, 3)
    return model, params, (x, y)


def _dense_hvp(plain_loss, params, batches, v):
    """The dense Hessian of `plain_loss` on each batch (one compilation), averaged,
    times v."""
    flat, unravel = ravel_pytree(params)
    hess = jax.jit(jax.hessian(lambda f, b: plain_loss(unravel(f), b)))
    return sum(hess(flat, b) for b in batches) @ ravel_pytree(v)[0] / len(batches)


def _matvec(op, v):
    """`op.matvec(v)` flattened, jitted (eager NNX tracing is slow)."""
    return ravel_pytree(jax.jit(lambda o, w: o.matvec(w))(op, v))[0]


def _random_like(params, seed):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape))


def test_train_mode_hvp_equals_the_dense_hessian_of_the_batch_statistics_function(bn_setup):
    model, params, batch = bn_setup
    train_fn, _ = pure(model, "train")

    def loss_fn(p, b):
        return ls.cross_entropy(train_fn(p, b[0]), b[1])

    def plain_loss(p, b):
        return ls.cross_entropy(plain_bn_cnn(p, b[0]), b[1])

    np.testing.assert_allclose(jax.jit(loss_fn)(params, batch),
                               jax.jit(plain_loss)(params, batch), rtol=1e-12)
    v = _random_like(params, 4)
    ref = _dense_hvp(plain_loss, params, [batch], v)
    hv = _matvec(ls.hessian(loss_fn, params, batch), v)
    np.testing.assert_allclose(hv, ref, rtol=1e-9, atol=1e-11)

    # With chunks, each chunk is normalized with its own statistics: the operator is the
    # mean of the chunks' Hessians, a different matrix from the whole batch's.
    x, y = batch
    chunks = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref_chunked = _dense_hvp(plain_loss, params, chunks, v)
    hv_chunked = _matvec(ls.hessian(loss_fn, params, batch, chunk_size=6), v)
    np.testing.assert_allclose(hv_chunked, ref_chunked, rtol=1e-9, atol=1e-11)
    assert np.linalg.norm(hv_chunked - hv) > 1e-3 * np.linalg.norm(hv)


def test_eval_mode_hvp_equals_the_dense_hessian_with_fixed_statistics(bn_setup):
    model, params, batch = bn_setup
    key = jax.random.key(5)
    stats = jax.tree.map(lambda a: a + 0.2 * jnp.abs(jax.random.normal(key, a.shape)),
                         batch_stats(model))
    eval_fn, _ = pure(model, "eval", batch_stats=stats)
    stats = _f64(stats)

    def loss_fn(p, b):
        return ls.cross_entropy(eval_fn(p, b[0]), b[1])

    def plain_loss(p, b):
        return ls.cross_entropy(plain_bn_cnn(p, b[0], stats), b[1])

    v = _random_like(params, 6)
    ref = _dense_hvp(plain_loss, params, [batch], v)
    # In eval mode examples are independent, so chunking changes nothing.
    for chunk in (None, 6):
        hv = _matvec(ls.hessian(loss_fn, params, batch, chunk_size=chunk), v)
        np.testing.assert_allclose(hv, ref, rtol=1e-6, atol=1e-9)
    # The GGN of the eval-mode function against the dense Jᵀ H J.
    flat, unravel = ravel_pytree(params)
    x, y = batch
    jac = jax.jit(jax.jacobian(lambda f: plain_bn_cnn(unravel(f), x, stats)))(flat)
    p = jax.nn.softmax(plain_bn_cnn(params, x, stats))
    h_out = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    dense_ggn = jnp.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / x.shape[0]
    gv = _matvec(ls.ggn(eval_fn, params, batch), v)
    np.testing.assert_allclose(gv, dense_ggn @ ravel_pytree(v)[0],
                               rtol=1e-6, atol=1e-9)


def plain_transformer(params, x, num_heads, patch):
    n = x.shape[0]
    t = x.reshape(n, -1, patch) @ params["embed"]["kernel"] + params["embed"]["bias"]
    t = t + params["position"]

    def layer_norm(z, p):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / jnp.sqrt(var + EPS_LN) * p["scale"] + p["bias"]

    def dense(z, p):
        return z @ p["kernel"] + p["bias"]

    for b in params["blocks"].values():
        d = t.shape[-1]
        qkv = dense(layer_norm(t, b["norm1"]), b["qkv"])
        q, k, v = (qkv[..., i * d:(i + 1) * d].reshape(n, -1, num_heads, d // num_heads)
                   for i in range(3))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(d // num_heads)
        att = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(scores, -1), v)
        t = t + dense(att.reshape(n, -1, d), b["proj"])
        t = t + dense(jax.nn.gelu(dense(layer_norm(t, b["norm2"]), b["fc1"])), b["fc2"])
    return dense(layer_norm(t, params["norm"]).mean(1), params["head"])


def test_transformer_hvp_equals_the_dense_hessian():
    model = Transformer1D(3, length=12, patch_size=4, dim=4, depth=1, num_heads=2,
                          mlp_ratio=2, rngs=nnx.Rngs(0))
    apply_fn, params = pure(model)
    flat, unravel = ravel_pytree(_f64(params))
    params = unravel(flat + 0.2 * jax.random.normal(jax.random.key(7), flat.shape))
    x = jax.random.normal(jax.random.key(8), (9, 12))
    y = jax.random.randint(jax.random.key(9), (9,), 0, 3)
    np.testing.assert_allclose(jax.jit(apply_fn)(params, x),
                               jax.jit(plain_transformer, static_argnums=(2, 3))(
                                   params, x, 2, 4),
                               rtol=1e-12, atol=1e-12)

    def plain_loss(p, b):
        return ls.cross_entropy(plain_transformer(p, b[0], 2, 4), b[1])

    def loss_fn(p, b):
        return ls.cross_entropy(apply_fn(p, b[0]), b[1])

    v = _random_like(params, 10)
    ref = _dense_hvp(plain_loss, params, [(x, y)], v)
    hv = _matvec(ls.hessian(loss_fn, params, (x, y)), v)
    np.testing.assert_allclose(hv, ref, rtol=1e-9, atol=1e-11)
