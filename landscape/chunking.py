"""Exact averages over a dataset evaluated in fixed-size chunks.

The mean of a per-chunk mean over N examples split into chunks of size c is the
weighted sum of the full chunks (weight c/N each) and the remainder (weight r/N).
Full chunks run under `lax.scan` with a running sum, so memory is bounded by one chunk.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from landscape import _validate


def chunk_mean(fn: Callable[[Any, jax.Array], Any], batch: Any,
               chunk_size: int | None = None, *,
               place: Callable[[Any, int], Any] | None = None) -> Any:
    """Exact mean over all examples of `batch` of `fn`, evaluated chunk by chunk.

    Args:
      fn: `fn(chunk, index) -> pytree`, the *mean* over the examples of `chunk`;
        `index` is the chunk's integer position (use it to fold a random key).
      batch: pytree whose leaves share a leading example axis of length N.
      chunk_size: examples per chunk; None evaluates the whole batch at once.
      place: `place(tree, axis)` puts the example axis `axis` of a tree's leaves on
        devices (a sharding constraint; `sharding.Layout.place_chunk`), applied to the
        stacked chunks and to each chunk, so the chunks stay split over the data axis.

    Returns:
      The pytree `(1/N) * sum_i fn_i`, exactly (remainder chunk weighted by its size).

    Example:
      >>> mean_loss = chunk_mean(lambda b, i: loss_fn(params, b), data, chunk_size=512)
    """
    n = _validate.num_examples(batch)
    place = place or (lambda tree, axis: tree)
    if chunk_size is None or chunk_size >= n:
        return fn(place(batch, 0), jnp.asarray(0))
    c = _validate.positive_int(chunk_size, "chunk_size")
    num_full, rem = divmod(n, c)

    def take(lo, hi):
        return jax.tree.map(lambda x: x[lo:hi], batch)

    full = place(jax.tree.map(
        lambda x: x[: num_full * c].reshape((num_full, c) + x.shape[1:]), batch), 1)

    def body(total, xs):
        chunk, i = xs
        out = fn(place(chunk, 0), i)
        return jax.tree.map(jnp.add, total, out), None

    first = fn(place(jax.tree.map(lambda x: x[0], full), 0), jnp.asarray(0))
    if num_full > 1:
        rest = jax.tree.map(lambda x: x[1:], full)
        total, _ = jax.lax.scan(body, first, (rest, jnp.arange(1, num_full)))
    else:
        total = first
    total = jax.tree.map(lambda t: t * (c / n), total)
    if rem:
        tail = fn(place(take(num_full * c, n), 0), jnp.asarray(num_full))
        total = jax.tree.map(lambda t, r: t + r * (rem / n), total, tail)
    return total
