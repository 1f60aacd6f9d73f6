"""Curvature over examples sharded across local devices.

When an operator's batch is split over devices along its example axis (`shard_batch`,
or any `NamedSharding` whose first dimension names mesh axes), every matvec and
`value()` runs under `jax.shard_map`: each device averages its own examples chunk by
chunk and one `psum` adds the devices' shares, so eigenvalues, traces and densities over
a whole training set use every device while the Lanczos and probe arithmetic stays
replicated. The mean is exact: N = d·q + r examples give d device shares of q examples
(weight q/N each) plus a remainder of r < d examples computed replicated (weight r/N).
The default mesh is `jax.devices()`, so hosts that joined with
`jax.distributed.initialize` add their devices to it when every process holds the
same batch (tested on one host only).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from landscape import _validate
from landscape.chunking import chunk_mean

AXIS = "examples"


def _mesh(devices) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("`devices` is empty; pass None for every device or a list.")
    # Auto axes: results can be indexed freely (explicit axes raise ShardingTypeError).
    return Mesh(np.array(devices), (AXIS,), axis_types=(AxisType.Auto,))


def shard_batch(batch: Any, devices=None) -> Any:
    """`batch` with its example axis split evenly over `devices` (default: all).

    Operators built on the result (`ls.hessian`, `ls.ggn`, `ls.fisher`) compute every
    matvec with each device averaging its own examples. The number of examples must be
    a multiple of the number of devices; for any other count use `ls.shard(op)`, which
    handles the remainder.

    Example:
      >>> data = ls.shard_batch((x, y))                 # 4000 examples, 8 devices
      >>> H = ls.hessian(loss_fn, params, data, chunk_size=250)
      >>> ls.eigenvalues(H, k=1, key=key).values        # every device works on it
    """
    n = _validate.num_examples(batch)
    mesh = _mesh(devices)
    if n % mesh.size:
        raise ValueError(f"`batch` holds {n} examples, not a multiple of the {mesh.size} "
                         "devices; trim it, or build the operator first and call "
                         "`ls.shard(op)`, which computes the remainder on every device.")
    return jax.device_put(batch, NamedSharding(mesh, P(AXIS)))


def batch_shards(batch: Any) -> tuple[Mesh, tuple[str, ...]] | None:
    """`(mesh, axes)` when every leaf of a concrete `batch` is split over the same mesh
    axes along its example dimension (more than one device); otherwise None."""
    leaves = jax.tree.leaves(batch)
    if not leaves or not _validate.is_concrete(batch):
        return None
    found = set()
    for x in leaves:
        s = getattr(x, "sharding", None)
        if not isinstance(s, NamedSharding) or len(s.spec) == 0 or s.spec[0] is None:
            return None
        first = s.spec[0]
        found.add((s.mesh, tuple(first) if isinstance(first, (tuple, list)) else (first,)))
    if len(found) != 1:
        return None
    mesh, axes = found.pop()
    if math.prod(mesh.shape[a] for a in axes) == 1:
        return None
    if any(t != AxisType.Auto for t in mesh.axis_types):
        mesh = Mesh(mesh.devices, mesh.axis_names,
                    axis_types=(AxisType.Auto,) * len(mesh.axis_names))
    return mesh, axes


def replicate(tree: Any, shards) -> Any:
    """`tree` copied to every device of the mesh (when concrete), so jit sees one mesh."""
    if shards is None or not _validate.is_concrete(tree):
        return tree
    return jax.device_put(tree, NamedSharding(shards[0], P()))


def place_batch(batch: Any, shards) -> Any:
    """`batch` on the mesh's example axes when its size allows; unchanged otherwise."""
    if shards is None or not _validate.is_concrete(batch):
        return batch
    mesh, axes = shards
    d = math.prod(mesh.shape[a] for a in axes)
    if _validate.num_examples(batch) % d:
        return batch
    return jax.device_put(batch, NamedSharding(mesh, _spec(axes)))


def _spec(axes: tuple[str, ...]) -> P:
    return P(axes[0] if len(axes) == 1 else axes)


def shard(op, devices=None):
    """`op` with its examples split over `devices` (default: every device).

    Works for any number of examples: `d·q` of them are split evenly, the last `r < d`
    are computed on every device and weighted `r/N`, so the operator is the same matrix
    to rounding. With the true Fisher, the sampled targets follow the per-device chunk
    layout, so they match an unsharded operator only when each device's share is a
    multiple of `chunk_size` and `chunk_size` divides that layout the same way.

    Example:
      >>> H = ls.shard(ls.hessian(loss_fn, params, (x, y), chunk_size=250))
      >>> ls.trace(H, key=jax.random.key(0)).value
    """
    if not hasattr(op, "shards") or not hasattr(op, "batch"):
        raise ValueError("`op` must be a curvature operator with a batch (ls.hessian, "
                         f"ls.ggn, ls.fisher); got {type(op).__name__}.")
    shards = (_mesh(devices), (AXIS,))
    return dataclasses.replace(op, params=replicate(op.params, shards),
                               batch=place_batch(op.batch, shards), shards=shards,
                               key=replicate(op.key, shards))


def sharded_mean(fn: Callable[[Any, Any, jax.Array], Any], args: Any, batch: Any,
                 chunk_size: int | None, shards) -> Any:
    """Exact mean over the examples of `batch` of `fn(args, chunk, index)` (a per-chunk
    mean), each device averaging its share chunk by chunk; `args` is replicated."""
    mesh, axes = shards
    d = math.prod(mesh.shape[a] for a in axes)
    n = _validate.num_examples(batch)
    q, r = divmod(n, d)
    per_device = 1 if chunk_size is None or chunk_size >= q else -(-q // chunk_size)
    name = axes[0] if len(axes) == 1 else axes
    total = None
    if q:
        def local(args, part):
            # Varying per device: otherwise reverse-mode AD through the replicated
            # parameters would insert its own psum before ours.
            args = jax.tree.map(lambda x: jax.lax.pcast(x, name, to="varying"), args)
            first = jax.lax.axis_index(name) * per_device
            out = chunk_mean(lambda c, i: fn(args, c, first + i), part, chunk_size)
            return jax.lax.psum(out, name)

        head = jax.tree.map(lambda x: x[: q * d], batch)
        summed = jax.shard_map(local, mesh=mesh, in_specs=(P(), _spec(axes)),
                               out_specs=P())(args, head)
        total = jax.tree.map(lambda s: s * (q / n), summed)
    if r:
        tail = jax.tree.map(lambda x: x[q * d:], batch)
        rest = chunk_mean(lambda c, i: fn(args, c, d * per_device + i), tail, chunk_size)
        rest = jax.tree.map(lambda t: t * (r / n), rest)
        total = rest if total is None else jax.tree.map(jax.numpy.add, total, rest)
    return total
