"""Pure views of NNX models: train and eval mode, dropout, precise BatchNorm statistics.

`pure(model, mode)` turns an `nnx.Module` into `(apply_fn, params)`, the form every
`landscape` function and optax expect; `population_statistics` recomputes BatchNorm's
running statistics over a dataset.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

import landscape as ls

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


def has_batch_norm(model: nnx.Module) -> bool:
    return any(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(model))


def _dropouts(model: nnx.Module) -> list:
    return [m for _, m in nnx.iter_graph(model)
            if isinstance(m, nnx.Dropout) and m.rate > 0]


def batch_stats(model: nnx.Module) -> dict:
    """The model's BatchNorm running statistics as a plain nested dict (`{}` if none)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def _view(model: nnx.Module, mode: str, dropout: bool) -> nnx.Module:
    kwargs = {}
    if has_batch_norm(model):
        kwargs["use_running_average"] = mode == "eval"
    if _dropouts(model):
        kwargs["deterministic"] = not dropout
    return nnx.view(model, **kwargs) if kwargs else model


def _seed_dropout(module: nnx.Module, key: jax.Array) -> None:
    """Give each Dropout of a freshly merged module its own stream from `key`."""
    for i, layer in enumerate(_dropouts(module)):
        layer.rngs.key[...] = jax.random.fold_in(key, i)
        layer.rngs.count[...] = jnp.zeros_like(layer.rngs.count[...])


def _check_mode(model: nnx.Module, mode, batch_stats, dropout) -> str:
    """The mode `pure` runs `model` in (eval for stateless models given None)."""
    stateful = has_batch_norm(model)
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
    return mode


def _with_stats(viewed: nnx.Module, batch_stats: Any) -> nnx.Module:
    """A copy of the eval-mode view holding the running statistics `batch_stats`."""
    viewed = nnx.clone(viewed)  # a view shares variables with the user's model
    stats = nnx.state(viewed, nnx.BatchStat)
    if jax.tree.structure(nnx.to_pure_dict(stats)) != jax.tree.structure(batch_stats):
        raise ValueError("`batch_stats` must have the structure of "
                         "`batch_stats(model)`.")
    nnx.replace_by_pure_dict(stats, jax.tree.map(jnp.asarray, batch_stats))
    nnx.update(viewed, stats)
    return viewed


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
      >>> from experiments.models import CNN1D
      >>> model = CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0))
      >>> train_fn, params = pure(model, "train")
      >>> ...   # train params on a loss built from train_fn
      >>> stats = population_statistics(model, params, x_train, chunk_size=1000)
      >>> eval_fn, _ = pure(model, "eval", batch_stats=stats)
    """
    mode = _check_mode(model, mode, batch_stats, dropout)
    viewed = _view(model, mode, dropout)
    if batch_stats is not None:
        viewed = _with_stats(viewed, batch_stats)
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
      >>> from experiments.models import CNN1D
      >>> model = CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0))
      >>> train_fn, params = pure(model, "train")
      >>> ...   # train params
      >>> stats = population_statistics(model, params, x_train, chunk_size=1000)
      >>> eval_fn, _ = pure(model, "eval", batch_stats=stats)
    """
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
