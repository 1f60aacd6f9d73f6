"""The loss along lines and planes through parameter space.

`interpolate` (Goodfellow, Vinyals & Saxe 2015, "Qualitatively characterizing neural
network optimization problems"), `surface_1d` and `surface_2d` (Li et al. 2018) all
evaluate `origin + Σ_j c_j d_j` at a grid of coordinates c. The grid points run as
vmapped groups of `points_per_chunk` inside one `lax.map` under one `jax.jit`, and
each point's loss is averaged exactly over `chunk_size` examples at a time, so memory
is bounded by (points per chunk) × (examples per chunk), whatever the grid and data.

Each function takes the training `loss_fn`, optionally a `metric_fn` (accuracy, say)
of the same form `fn(params, batch) -> scalar mean`, and an optional `test_batch`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from landscape import _validate
from landscape.chunking import chunk_mean

Fn = Callable[[Any, Any], jax.Array]


class Curve(NamedTuple):
    """Values along a line: `alphas` `(n,)` and each value `(n,)` (None if not asked)."""

    alphas: jax.Array
    train_loss: jax.Array
    train_metric: jax.Array | None
    test_loss: jax.Array | None
    test_metric: jax.Array | None


class Surface(NamedTuple):
    """Values on a plane: `xs` `(nx,)`, `ys` `(ny,)`, each value `(nx, ny)` with
    `[i, j]` at `(xs[i], ys[j])` (None if not asked)."""

    xs: jax.Array
    ys: jax.Array
    train_loss: jax.Array
    train_metric: jax.Array | None
    test_loss: jax.Array | None
    test_metric: jax.Array | None


@functools.partial(jax.jit, static_argnames=("loss_fn", "metric_fn", "chunk_size",
                                             "points_per_chunk"))
def _evaluate(loss_fn, metric_fn, origin, dirs, coords, train, test, *, chunk_size,
              points_per_chunk):
    def point(c):
        p = jax.tree.map(lambda o, d: o + jnp.tensordot(c.astype(d.dtype), d, axes=1),
                         origin, dirs)

        def values(b, i):
            if metric_fn is None:
                return (loss_fn(p, b),)
            return loss_fn(p, b), metric_fn(p, b)

        out = chunk_mean(values, train, chunk_size)
        if test is not None:
            out = out + chunk_mean(values, test, chunk_size)
        return out

    return jax.lax.map(point, coords, batch_size=points_per_chunk)


def _stack(directions: Any, params: Any, k: int) -> Any:
    """Directions as one pytree like params with a leading axis of length k."""
    if isinstance(directions, (tuple, list)) and len(directions) == k and all(
            jax.tree.structure(d) == jax.tree.structure(params) for d in directions):
        for i, d in enumerate(directions):
            _validate.same_structure(d, params, name=f"directions[{i}]")
        return jax.tree.map(
            lambda p, *ds: jnp.stack([jnp.asarray(x, jnp.result_type(p)) for x in ds]),
            params, *directions)
    if jax.tree.structure(directions) == jax.tree.structure(params):
        leaves = jax.tree.leaves(directions)
        if all(jnp.ndim(x) >= 1 and jnp.shape(x)[0] == k for x in leaves):
            _validate.same_structure(jax.tree.map(lambda x: x[0], directions), params,
                                     name="directions[i]")
            return jax.tree.map(lambda d, p: jnp.asarray(d, jnp.result_type(p)),
                                directions, params)
    raise ValueError(f"`directions` must be {k} pytree(s) with the structure and shapes "
                     f"of `params` (a tuple of {k}, or one pytree with a leading axis "
                     f"of {k}).\n  params: {jax.tree.structure(params)}\n  directions: "
                     f"{jax.tree.structure(directions)}")


def _grid(values: Any, name: str) -> jax.Array:
    arr = jnp.asarray(values)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise ValueError(f"`{name}` must be a non-empty 1-D array of coordinates; got "
                         f"shape {arr.shape}.")
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    _validate.check_finite(f"`{name}`", arr)
    return arr


def _run(loss_fn, metric_fn, origin, dirs, coords, batch, test_batch, chunk_size,
         points_per_chunk):
    for fn, name in ((loss_fn, "loss_fn"), (metric_fn, "metric_fn")):
        if fn is not None and not callable(fn):
            raise ValueError(f"`{name}` must be callable `fn(params, batch)`; got "
                             f"{type(fn).__name__}.")
    n = _validate.num_examples(batch)
    if test_batch is not None:
        _validate.num_examples(test_batch, "test_batch")
        # The test set may hold another number of examples: compare structure only.
        if jax.tree.structure(test_batch) != jax.tree.structure(batch):
            raise ValueError("`test_batch` must have the tree structure of `batch`.")
    if chunk_size is not None:
        _validate.positive_int(chunk_size, "chunk_size")
    if points_per_chunk is None:
        # One point at a time measured fastest on CPU (benchmarks/bench_surfaces.py):
        # vmapping over weights turns each matmul into a slower batched one there.
        points_per_chunk = 1 if jax.default_backend() == "cpu" else 32
    ppc = _validate.positive_int(points_per_chunk, "points_per_chunk")
    first = jax.tree.map(lambda x: x[: min(n, chunk_size or n)], batch)
    for fn, name in ((loss_fn, "loss_fn"), (metric_fn, "metric_fn")):
        if fn is not None:
            out = jax.eval_shape(fn, origin, first)
            if getattr(out, "shape", None) != ():
                raise ValueError(f"`{name}` must return a scalar mean over the batch; it "
                                 f"returned {getattr(out, 'shape', type(out).__name__)}.")
    out = _evaluate(loss_fn, metric_fn, origin, dirs, coords, batch, test_batch,
                    chunk_size=chunk_size, points_per_chunk=min(ppc, coords.shape[0]))
    m = 2 if metric_fn is not None else 1
    train = out[:m]
    test = out[m:] if test_batch is not None else (None, None)
    train_metric = train[1] if metric_fn is not None else None
    test_loss = test[0]
    test_metric = test[1] if (metric_fn is not None and test_batch is not None) else None
    return train[0], train_metric, test_loss, test_metric


def interpolate(loss_fn: Fn, params_a: Any, params_b: Any, batch: Any, *,
                alphas: Any = None, metric_fn: Fn | None = None, test_batch: Any = None,
                chunk_size: int | None = None, points_per_chunk: int | None = None) -> Curve:
    """Loss along the straight line (1 − α)·params_a + α·params_b.

    Goodfellow et al. 2015: a monotone decrease from initialization to solution says
    the path met no barrier. α = 0 is `params_a`, α = 1 is `params_b`; values outside
    [0, 1] extrapolate.

    Args:
      alphas: coordinates along the line (default 21 points from 0 to 1).
      metric_fn: optional `fn(params, batch) -> scalar mean`, e.g. accuracy.
      test_batch: optional second batch evaluated at the same points.

    Example:
      >>> c = ls.interpolate(loss_fn, params_init, params_final, (x, y),
      ...                    alphas=jnp.linspace(-0.5, 1.5, 41))
      >>> c.train_loss
    """
    _validate.same_structure(params_b, params_a, name="params_b", like_name="params_a")
    alphas = _grid(jnp.linspace(0.0, 1.0, 21) if alphas is None else alphas, "alphas")
    dirs = jax.tree.map(lambda a, b: (jnp.asarray(b) - jnp.asarray(a))[None],
                        params_a, params_b)
    out = _run(loss_fn, metric_fn, params_a, dirs, alphas[:, None], batch, test_batch,
               chunk_size, points_per_chunk)
    return Curve(alphas, *out)


def surface_1d(loss_fn: Fn, params: Any, direction: Any, batch: Any, *,
               alphas: Any = None, metric_fn: Fn | None = None, test_batch: Any = None,
               chunk_size: int | None = None, points_per_chunk: int | None = None) -> Curve:
    """Loss along params + α·direction.

    Args:
      direction: pytree like params (e.g. from `filter_normalized_direction`).
      alphas: coordinates (default 51 points from −1 to 1); α = 0 is `params`.
      metric_fn, test_batch, chunk_size, points_per_chunk: as in `surface_2d`.

    Example:
      >>> d = ls.filter_normalized_direction(jax.random.key(0), params)
      >>> c = ls.surface_1d(loss_fn, params, d, (x, y), metric_fn=acc_fn)
    """
    dirs = _stack((direction,), params, 1)
    alphas = _grid(jnp.linspace(-1.0, 1.0, 51) if alphas is None else alphas, "alphas")
    out = _run(loss_fn, metric_fn, params, dirs, alphas[:, None], batch, test_batch,
               chunk_size, points_per_chunk)
    return Curve(alphas, *out)


def surface_2d(loss_fn: Fn, params: Any, directions: Any, batch: Any, *,
               xs: Any = None, ys: Any = None, metric_fn: Fn | None = None,
               test_batch: Any = None, chunk_size: int | None = None,
               points_per_chunk: int | None = None) -> Surface:
    """Loss on the plane params + x·d₁ + y·d₂ (Li et al. 2018).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss.
      params: the centre of the plane.
      directions: `(d1, d2)`, two pytrees like params, or one pytree with a leading
        axis of 2 (as `pca_directions(...).directions`).
      batch: training examples (pytree with a leading example axis).
      xs, ys: coordinates along d₁ and d₂ (default 51 points from −1 to 1 each).
      metric_fn: optional `fn(params, batch) -> scalar mean` (accuracy, say).
      test_batch: optional test examples, evaluated at the same points.
      chunk_size: examples per chunk (None: the whole batch at once).
      points_per_chunk: grid points vmapped together; memory grows with it (default 1
        on CPU, where it measured fastest, and 32 on accelerators).

    Returns:
      `Surface(xs, ys, train_loss, train_metric, test_loss, test_metric)`, values of
      shape `(len(xs), len(ys))`.

    Example:
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> dirs = (ls.filter_normalized_direction(k1, params),
      ...         ls.filter_normalized_direction(k2, params))
      >>> s = ls.surface_2d(loss_fn, params, dirs, (x, y), chunk_size=1000)
    """
    dirs = _stack(directions, params, 2)
    xs = _grid(jnp.linspace(-1.0, 1.0, 51) if xs is None else xs, "xs")
    ys = _grid(jnp.linspace(-1.0, 1.0, 51) if ys is None else ys, "ys")
    gx, gy = jnp.meshgrid(xs, ys, indexing="ij")
    coords = jnp.stack([gx.ravel(), gy.ravel()], axis=1)
    out = _run(loss_fn, metric_fn, params, dirs, coords, batch, test_batch, chunk_size,
               points_per_chunk)
    shape = (xs.shape[0], ys.shape[0])
    return Surface(xs, ys, *(None if v is None else v.reshape(shape) for v in out))
