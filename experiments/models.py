"""Models in Flax NNX, exposed to the rest of Basin as pure functions of parameters."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

_ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jax.nn.tanh, "gelu": jax.nn.gelu,
                "linear": lambda x: x}


class MLP(nnx.Module):
    """Fully connected network `sizes[0] → … → sizes[-1]` with one activation between layers.

    Example:
      >>> model = MLP((40, 256, 256, 10), rngs=nnx.Rngs(0))
      >>> apply_fn, params = pure(model)
      >>> logits = apply_fn(params, x)
    """

    def __init__(self, sizes: Sequence[int], *, activation: str = "relu",
                 rngs: nnx.Rngs):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"`sizes` must list at least two positive widths; got {sizes}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; "
                             f"got {activation!r}.")
        self.activation = activation
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


def _as_signal(x: jax.Array) -> jax.Array:
    """`(N, length)` signals become `(N, length, 1)`: one input channel."""
    return x[..., None] if x.ndim == 2 else x


class CNN1D(nnx.Module):
    """1-D convolutions (same padding, stride 2 after the first) then global average and a
    linear read-out: `channels[i]` filters of width `kernel_size` in layer i.

    `batch_norm=True` puts a BatchNorm between each convolution (then without bias,
    which the normalization would cancel) and its activation. Such a model has state
    (running statistics): turn it into a function with `pure(model, mode="train")` or
    `pure(model, mode="eval")`.

    Example:
      >>> model = CNN1D(num_classes=10, channels=(16, 32, 32), rngs=nnx.Rngs(0))
      >>> model(x).shape   # x: (N, 40) -> (N, 10)
      >>> bn = CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0))
      >>> train_fn, params = pure(bn, mode="train")
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 32), *,
                 kernel_size: int = 5, in_channels: int = 1, activation: str = "relu",
                 batch_norm: bool = False, rngs: nnx.Rngs):
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"`channels` must list positive widths; got {channels}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; "
                             f"got {activation!r}.")
        self.activation = activation
        widths = (in_channels, *channels)
        self.batch_norm = bool(batch_norm)
        self.convs = nnx.List([nnx.Conv(a, b, (kernel_size,), strides=1 if i == 0 else 2,
                                        use_bias=not self.batch_norm, rngs=rngs)
                               for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
        self.norms = nnx.List([nnx.BatchNorm(c, rngs=rngs) for c in channels]
                              if self.batch_norm else [])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        x = _as_signal(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.batch_norm:
                x = self.norms[i](x)
            x = act(x)
        return self.head(x.mean(axis=-2))


class ResNet1D(nnx.Module):
    """A 1-D residual network: a stem convolution, `depth` blocks of two convolutions with
    an identity skip (`skip=False` removes every skip, giving the plain network of the
    same depth, as in Li et al. 2018), global average and a linear read-out.

    Example:
      >>> plain = ResNet1D(10, depth=8, skip=False, rngs=nnx.Rngs(0))
    """

    def __init__(self, num_classes: int, *, width: int = 16, depth: int = 4,
                 kernel_size: int = 5, in_channels: int = 1, skip: bool = True,
                 rngs: nnx.Rngs):
        if width < 1 or depth < 1:
            raise ValueError(f"`width` and `depth` must be positive; got {width}, {depth}.")
        self.skip = bool(skip)
        self.stem = nnx.Conv(in_channels, width, (kernel_size,), rngs=rngs)
        self.blocks = nnx.List([
            nnx.List([nnx.Conv(width, width, (kernel_size,), rngs=rngs),
                      nnx.Conv(width, width, (kernel_size,), rngs=rngs)])
            for _ in range(depth)])
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem(_as_signal(x)))
        for first, second in self.blocks:
            h = second(jax.nn.relu(first(x)))
            x = jax.nn.relu(h + x if self.skip else h)
        return self.head(x.mean(axis=-2))


class _Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, *,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        # Plain dense projections (not nnx.MultiHeadAttention's rank-3 kernels) so that
        # K-FAC's layer finder sees every weight matrix of the block.
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def _drop(self, x):
        return x if self.dropout is None else self.dropout(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (a.reshape(n, t, h, d // h) for a in (q, k, v))
        scores = jnp.einsum("nthd,nshd->nhts", q, k) / jnp.sqrt(d // h).astype(x.dtype)
        att = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self._drop(self.proj(att.reshape(n, t, d)))
        return x + self._drop(self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)))))


class Transformer1D(nnx.Module):
    """A small vision-transformer-style classifier for 1-D signals (MNIST-1D).

    The signal of `length` samples is cut into `length // patch_size` patches, each
    embedded linearly as a token, plus a learned position embedding; `depth`
    pre-LayerNorm blocks of multi-head self-attention (`num_heads` heads) and a GELU
    MLP (`mlp_ratio * dim` hidden units); a final LayerNorm, the mean over tokens and a
    linear head. The default size (dim 128, depth 2) has about 400 000 parameters.
    `dropout` (off by default) applies to each residual branch; with it on, the model
    needs `pure(model, mode="train", dropout=True)` and a key per call.

    Example:
      >>> model = Transformer1D(10, rngs=nnx.Rngs(0))
      >>> apply_fn, params = pure(model)
      >>> apply_fn(params, x).shape   # x: (N, 40) -> (N, 10)
    """

    def __init__(self, num_classes: int, *, length: int = 40, patch_size: int = 4,
                 dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
                 in_channels: int = 1, dropout: float = 0.0, rngs: nnx.Rngs):
        for name, value in (("length", length), ("patch_size", patch_size), ("dim", dim),
                            ("depth", depth), ("num_heads", num_heads),
                            ("mlp_ratio", mlp_ratio)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if length % patch_size:
            raise ValueError(f"`patch_size` must divide `length` ({length}); "
                             f"got {patch_size}.")
        if dim % num_heads:
            raise ValueError(f"`num_heads` must divide `dim` ({dim}); got {num_heads}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
        self.patch_size = patch_size
        self.embed = nnx.Linear(patch_size * in_channels, dim, rngs=rngs)
        self.position = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (length // patch_size, dim)))
        self.blocks = nnx.List([_Block(dim, num_heads, mlp_ratio * dim, dropout, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _as_signal(x)
        n, length, c = x.shape
        tokens = x.reshape(n, length // self.patch_size, self.patch_size * c)
        x = self.embed(tokens) + self.position[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=-2))


# ------------------------------------------------------------ pure functions ---
#
# A model with BatchNorm is two different functions of its parameters:
# - train mode normalizes each layer with the statistics of the batch it is given, so
#   an example's output depends on the other examples in the batch; this is the
#   function SGD optimizes (and its Hessian is the curvature SGD sees);
# - eval mode normalizes with fixed running statistics, so examples are independent.
# `pure` makes the choice explicit. In train mode a curvature operator with
# `chunk_size=c` averages the curvature of c-example batches, each normalized with its
# own statistics: c is part of the function (and c = None, the whole batch, is another
# function again). Pure training never updates running statistics; set them afterwards
# with `population_statistics` ("precise BN").

_MODES = ("train", "eval")


def _has_batch_norm(model: nnx.Module) -> bool:
    return any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model))


def _dropouts(model: nnx.Module) -> list:
    return [m for _, m in nnx.iter_graph(model)
            if isinstance(m, nnx.Dropout) and m.rate > 0]


def batch_stats(model: nnx.Module) -> dict:
    """The model's BatchNorm running statistics as a plain nested dict (`{}` if none)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _view(model: nnx.Module, mode: str, dropout: bool) -> nnx.Module:
    kwargs = {}
    if _has_batch_norm(model):
        kwargs["use_running_average"] = mode == "eval"
    if _dropouts(model):
        kwargs["deterministic"] = not dropout
    return nnx.view(model, **kwargs) if kwargs else model


def _seed_dropout(module: nnx.Module, key: jax.Array) -> None:
    """Give each Dropout of a freshly merged module its own stream from `key`."""
    for i, layer in enumerate(_dropouts(module)):
        layer.rngs.key[...] = jax.random.fold_in(key, i)
        layer.rngs.count[...] = jnp.zeros_like(layer.rngs.count[...])


def pure(model: nnx.Module, mode: str | None = None, *, batch_stats: Any = None,
         dropout: bool = False) -> tuple[Callable[..., Any], Any]:
    """`(apply_fn, params)` with `apply_fn(params, inputs) = model(inputs)`.

    `params` is a plain nested dict of arrays (`nnx.to_pure_dict`), what optax and every
    `landscape` function expect. The graph definition and any non-parameter state stay
    static inside `apply_fn`, so every JAX transformation sees `params` alone.

    Models with state need `mode`:

    - `mode="train"`: BatchNorm layers normalize with the statistics of the `inputs`
      they are given (the function SGD optimizes); gradients and curvature flow through
      those statistics. The running statistics are neither read nor updated.
    - `mode="eval"`: BatchNorm layers use running statistics held in the closure: the
      model's own, or `batch_stats` (a dict like `batch_stats(model)`, e.g. from
      `population_statistics`).

    Stateless models ignore `mode` (None is fine). Dropout is off unless
    `dropout=True`; then `apply_fn(params, inputs, key)` takes a `jax.random` key for
    its masks (fix the key, e.g. `lambda p, x: apply_fn(p, x, key)`, to measure the
    curvature of one dropout sample).

    Example:
      >>> model = CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0))
      >>> train_fn, params = pure(model, "train")
      >>> ...   # train params on a loss built from train_fn
      >>> stats = population_statistics(model, params, x_train, chunk_size=1000)
      >>> eval_fn, _ = pure(model, "eval", batch_stats=stats)
    """
    stateful = _has_batch_norm(model)
    if mode is None:
        if stateful:
            raise ValueError("`mode` must be 'train' (batch statistics) or 'eval' "
                             "(running statistics) for a model with BatchNorm; got None.")
        mode = "eval"
    if mode not in _MODES:
        raise ValueError(f"`mode` must be one of {_MODES}; got {mode!r}.")
    if batch_stats is not None and mode != "eval":
        raise ValueError("`batch_stats` are running statistics: give them with "
                         "mode='eval' only.")
    if dropout and not _dropouts(model):
        raise ValueError("`dropout=True` but the model has no Dropout layer with rate > 0.")
    viewed = _view(model, mode, dropout)
    if batch_stats is not None:
        viewed = nnx.clone(viewed)  # a view shares variables with the user's model
        stats = nnx.state(viewed, nnx.BatchStat)
        if jax.tree.structure(nnx.to_pure_dict(stats)) != jax.tree.structure(batch_stats):
            raise ValueError("`batch_stats` must have the structure of "
                             "`batch_stats(model)`.")
        nnx.replace_by_pure_dict(stats, jax.tree.map(jnp.asarray, batch_stats))
        nnx.update(viewed, stats)
    graphdef, state, rest = nnx.split(viewed, nnx.Param, ...)

    def merged(params):
        filled = jax.tree.map(lambda a: a, state)  # a fresh container to fill
        nnx.replace_by_pure_dict(filled, params)
        # Fresh variables for the rest too: train-mode BatchNorm writes (unused) running
        # statistics and dropout advances its stream, which must stay inside this trace;
        # the statistics take the parameters' precision so that write needs no cast.
        dtype = jnp.result_type(*jax.tree.leaves(params))
        fresh = jax.tree.map(lambda a: a.astype(dtype) if mode == "train" and jnp.issubdtype(
            a.dtype, jnp.floating) else a, rest)
        return nnx.merge(graphdef, filled, fresh)

    if dropout:
        def apply_fn(params, inputs, key):
            module = merged(params)
            _seed_dropout(module, key)
            return module(inputs)
    else:
        def apply_fn(params, inputs):
            return merged(params)(inputs)

    return apply_fn, nnx.to_pure_dict(state)


class _RecordingBatchNorm(nnx.BatchNorm):
    """BatchNorm that normalizes with its running statistics (eval mode) and overwrites
    them with the mean and the mean square of the input it was given."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        out = super().__call__(x, use_running_average=True, mask=mask)
        axes = tuple(i for i in range(x.ndim) if i not in
                     {a % x.ndim for a in ((self.axis,) if isinstance(self.axis, int)
                                           else self.axis)})
        # NNX keeps statistics in their own dtype (float32 even under x64): cast explicitly.
        self.mean[...] = x.mean(axes).astype(self.mean.dtype)
        self.var[...] = jnp.square(x).mean(axes).astype(self.var.dtype)
        return out


def population_statistics(model: nnx.Module, params: Any, inputs: Any, *,
                          chunk_size: int | None = None) -> dict:
    """Running statistics for `pure(model, "eval", batch_stats=...)` recomputed over a
    dataset ("precise BN"), at `params` (e.g. after pure training, which leaves the
    model's own running statistics at their initial values).

    The result is the population mean and (biased) variance of every BatchNorm layer's
    input over all of `inputs`, with the network run in eval mode on these same
    statistics: the eval-mode function then normalizes each layer's input over the
    dataset exactly. It is computed in passes over the data, `chunk_size` examples at a
    time (`landscape.chunk_mean`, exact whatever the chunk size), one pass per BatchNorm
    layer: after pass k the first k layers on any path are exact. This is the
    full-dataset version of precise BN (Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm"); with `chunk_size=None` it equals the statistics train mode computes
    on the whole of `inputs` as one batch.

    Args:
      model: the NNX model (its structure; its own statistics are not changed).
      params: parameters as `pure` returns them.
      inputs: the dataset's inputs, leading example axis.
      chunk_size: examples per forward pass (memory); None is all at once.

    Example:
      >>> train_fn, params = pure(model, "train")
      >>> ...   # train params
      >>> stats = population_statistics(model, params, x_train, chunk_size=1000)
      >>> eval_fn, _ = pure(model, "eval", batch_stats=stats)
    """
    import landscape as ls  # experiments -> landscape, never the other way

    layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    if not layers:
        raise ValueError("`model` has no BatchNorm layer: it has no statistics to set.")
    graphdef, state, rest = nnx.split(
        nnx.view(model, use_running_average=True, deterministic=True,
                 raise_if_not_found=False), nnx.Param, ...)
    filled = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(filled, params)

    def moments(stats, chunk):
        module = nnx.merge(graphdef, jax.tree.map(lambda a: a, filled),
                           jax.tree.map(lambda a: a, rest))
        nnx.update(module, _stats_state(module, stats))
        for _, m in nnx.iter_graph(module):
            if isinstance(m, nnx.BatchNorm):
                m.__class__ = _RecordingBatchNorm  # this fresh copy only
        module(chunk)
        return batch_stats(module)

    @jax.jit
    def one_pass(stats):
        m = ls.chunk_mean(lambda chunk, i: moments(stats, chunk), inputs, chunk_size)
        return _to_stats(m)

    stats = batch_stats(model)
    for _ in layers:
        stats = one_pass(stats)
    return stats


def _stats_state(module: nnx.Module, stats: dict):
    state = nnx.state(module, nnx.BatchStat)
    nnx.replace_by_pure_dict(state, stats)
    return state


def _to_stats(moments: dict) -> dict:
    """`{mean, var}` per layer from the recorded `{mean: E[x], var: E[x²]}`."""
    def layer(d):
        if isinstance(d, dict) and set(d) == {"mean", "var"}:
            return {"mean": d["mean"],
                    "var": jnp.maximum(d["var"] - jnp.square(d["mean"]), 0.0)}
        return {k: layer(v) for k, v in d.items()}

    return layer(moments)
