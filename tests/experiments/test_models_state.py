"""The BatchNorm CNN and the transformer in the model zoo: modes, precise BN, every
optimizer, K-FAC's layers, the runner (float32, as `basin run`)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import experiments
import landscape as ls
import transforms as tx
from experiments import config as cfglib
from experiments.config import ConfigError
from experiments.models import (CNN1D, Transformer1D, batch_stats, population_statistics,
                                pure)

TINY = str(Path(__file__).with_name("tiny.toml"))


def _tiny_bn():
    return CNN1D(4, channels=(3, 5), kernel_size=3, batch_norm=True, rngs=nnx.Rngs(0))


def _tiny_transformer(**kw):
    return Transformer1D(4, length=16, patch_size=4, dim=8, depth=1, num_heads=2,
                         rngs=nnx.Rngs(0), **kw)


def _data(n=24, length=16, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return jax.random.normal(kx, (n, length)) * 2 + 1, jax.random.randint(ky, (n,), 0, 4)


def numpy_bn_statistics(params, x, eps=1e-5):
    """Each BatchNorm input's mean and variance over the whole set, the net run with
    those same statistics (written in numpy; 'SAME' convolutions by hand)."""
    def conv(h, kernel, stride):
        k = kernel.shape[0]
        pad_total = max((-(-h.shape[1] // stride) - 1) * stride + k - h.shape[1], 0)
        lo = pad_total // 2
        h = np.pad(h, ((0, 0), (lo, pad_total - lo), (0, 0)))
        out_len = (h.shape[1] - k) // stride + 1
        return np.stack([np.einsum("nkc,kcd->nd", h[:, i * stride:i * stride + k], kernel)
                         for i in range(out_len)], axis=1)

    h = np.asarray(x, np.float64)[..., None]
    stats = {}
    for i in range(2):
        h = conv(h, np.asarray(params["convs"][i]["kernel"], np.float64), 1 if i == 0 else 2)
        mean, var = h.mean((0, 1)), h.var((0, 1))
        stats[i] = {"mean": mean, "var": var}
        norm = params["norms"][i]
        h = np.maximum((h - mean) / np.sqrt(var + eps) * np.asarray(norm["scale"])
                       + np.asarray(norm["bias"]), 0)
    return {"norms": stats}


def test_precise_bn_equals_numpy_population_statistics_in_any_chunking():
    model = _tiny_bn()
    _, params = pure(model, "train")
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape),
                          params)
    x, _ = _data(30)
    before = batch_stats(model)
    ref = numpy_bn_statistics(params, x)
    for chunk in (None, 7):
        stats = population_statistics(model, params, x, chunk_size=chunk)
        for i in range(2):
            for k in ("mean", "var"):
                np.testing.assert_allclose(stats["norms"][i][k], ref["norms"][i][k],
                                           rtol=2e-4, atol=2e-5, err_msg=f"{chunk} {i} {k}")
    jax.tree.map(np.testing.assert_array_equal, batch_stats(model), before)  # untouched
    # Eval mode on the population statistics is train mode on the whole set at once.
    eval_fn, _ = pure(model, "eval", batch_stats=stats)
    train_fn, _ = pure(model, "train")
    np.testing.assert_allclose(eval_fn(params, x), train_fn(params, x), rtol=1e-4,
                               atol=1e-4)
    # ...and it differs from eval mode on the model's initial running statistics.
    init_fn, _ = pure(model, "eval")
    assert np.abs(init_fn(params, x) - train_fn(params, x)).max() > 1e-2


def test_modes_and_their_errors():
    bn, plain = _tiny_bn(), CNN1D(4, channels=(3,), rngs=nnx.Rngs(0))
    x, _ = _data(6)
    with pytest.raises(ValueError, match="mode"):
        pure(bn)
    with pytest.raises(ValueError, match="mode"):
        pure(bn, "test")
    with pytest.raises(ValueError, match="batch_stats"):
        pure(bn, "train", batch_stats=batch_stats(bn))
    with pytest.raises(ValueError, match="batch_stats"):
        pure(bn, "eval", batch_stats={"norms": {}})
    with pytest.raises(ValueError, match="dropout"):
        pure(plain, dropout=True)
    with pytest.raises(ValueError, match="BatchNorm"):
        population_statistics(plain, pure(plain)[1], x)
    # A stateless model is one function whatever the mode.
    f, p = pure(plain)
    np.testing.assert_allclose(pure(plain, "train")[0](p, x), f(p, x))
    # Train mode: an example's output depends on the rest of the batch; eval: it does not.
    train_fn, params = pure(bn, "train")
    eval_fn, _ = pure(bn, "eval")
    assert np.abs(train_fn(params, x)[:3] - train_fn(params, x[:3])).max() > 1e-3
    np.testing.assert_allclose(eval_fn(params, x)[:3], eval_fn(params, x[:3]), rtol=1e-5,
                               atol=1e-6)


def test_dropout_is_off_unless_asked_and_then_follows_its_key():
    model = _tiny_transformer(dropout=0.5)
    x, _ = _data(5)
    off, params = pure(model)
    on, _ = pure(model, dropout=True)
    off, on = jax.jit(off), jax.jit(on)
    no_dropout = jax.jit(pure(_tiny_transformer())[0])
    np.testing.assert_allclose(off(params, x), no_dropout(params, x), rtol=1e-6)
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = on(params, x, k1)
    np.testing.assert_array_equal(a, on(params, x, k1))
    assert np.abs(on(params, x, k2) - a).max() > 1e-3
    assert np.abs(a - off(params, x)).max() > 1e-3



def test_transformer_size_and_kfac_sees_every_weight_matrix():
    default = nnx.eval_shape(lambda: Transformer1D(10, rngs=nnx.Rngs(0)))  # MNIST-1D
    assert 300_000 < sum(a.size for a in jax.tree.leaves(nnx.state(default, nnx.Param))) \
        < 500_000
    model = Transformer1D(10, length=40, patch_size=8, dim=8, depth=2, num_heads=2,
                          rngs=nnx.Rngs(0))
    apply_fn, params = pure(model)
    layers = tx.find_dense_layers(apply_fn, params, jnp.zeros((1, 40)))
    kernels = {jax.tree_util.keystr(path) for path, leaf in
               jax.tree.leaves_with_path(params) if path[-1].key == "kernel"}
    assert {layer.name for layer in layers} == kernels
    assert len(layers) == 2 + 4 * 2 and all(layer.bias is not None for layer in layers)
    # The BatchNorm CNN's convolutions are K-FAC layers too (KFC), besides its head.
    bn_fn, bn_params = pure(CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0)), "train")
    names = [layer.name for layer in tx.find_dense_layers(bn_fn, bn_params,
                                                          jnp.zeros((2, 40)))]
    kernels = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        bn_params)[0] if jax.tree_util.keystr(p).endswith("['kernel']")}
    assert set(names) == kernels and "['head']['kernel']" in names


def _hyper(name, apply_fn, params, x):
    lr = {"sgd": 0.05, "momentum": 0.05, "sam": 0.05, "asam": 0.05, "gsam": 0.05,
          "kfac": 0.05, "adahessian": 0.01}.get(name, 1e-3)
    hyper = {"learning_rate": lr}
    if name == "kfac":
        hyper["layers"] = tx.find_dense_layers(apply_fn, params, x[:1])
    return hyper


# A first-order and a curvature-based optimizer in the default run;
# the rest (compilations of 10-70 s on a loaded 2-core machine) with `-m slow`.
_FAST = ("sgd", "kfac")


@pytest.mark.parametrize("name", [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in tx.names()])
def test_every_optimizer_steps_on_both_new_models(name):
    x, y = _data(16)
    for apply_fn, params in (pure(_tiny_bn(), "train"), pure(_tiny_transformer())):
        def loss_fn(p, batch):
            return ls.cross_entropy(apply_fn(p, batch[0]), batch[1])

        opt = tx.make(name, **_hyper(name, apply_fn, params, x))

        @jax.jit
        def run(params):
            def step(carry, t):
                p, s = carry
                p, s, loss = tx.train_step(opt, loss_fn, p, s, (x, y),
                                           jax.random.fold_in(jax.random.key(0), t),
                                           apply_fn=apply_fn)
                return (p, s), loss
            (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), jnp.arange(3))
            return p, losses

        new, losses = run(params)
        assert np.all(np.isfinite(losses)), name
        assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(new))
        moved = sum(float(jnp.abs(a - b).sum()) for a, b in
                    zip(jax.tree.leaves(new), jax.tree.leaves(params)))
        assert moved > 0, name


@pytest.mark.slow
def test_the_runner_trains_and_measures_both_models(tmp_path):
    common = ["sweep.batch_size=[32]", "sweep.learning_rate=[0.05]", "sweep.seed=[0]",
              'measure.measures=["lambda_max", "trace"]']
    for table in ({"name": "cnn_bn", "channels": [4, 8]},
                  {"name": "transformer", "embed_dim": 16, "num_blocks": 1,
                   "patch_size": 8}):
        name = table["name"]
        cfg = cfglib.read(TINY) | {"model": table}
        res = experiments.run(cfg, out=tmp_path / name, overrides=common)
        (rec,) = res.records()
        assert rec["status"] == "finished", name
        assert all(np.isfinite(rec[m]) for m in ("train_loss", "test_accuracy",
                                                   "lambda_max", "trace")), name
        curve = [v for _, v in res.curves()[rec["member"]]]
        assert curve[-1] < curve[0], name
    with pytest.raises(ConfigError, match="num_heads"):
        experiments.load(cfglib.read(TINY) | {"model": {
            "name": "transformer", "embed_dim": 10, "num_heads": 4}})
    with pytest.raises(ConfigError, match="model.name"):
        experiments.load(cfglib.read(TINY) | {"model": {"name": "vit"}})
