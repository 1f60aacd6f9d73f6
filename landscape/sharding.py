"""Curvature over examples sharded across devices, and over sharded parameters.

Two layouts. Examples only (`shard(op)`, `shard_batch`): described below. Parameters
too (`shard(op, mesh=mesh, param_specs=...)`): each weight is placed with a
`NamedSharding` over the mesh (FSDP-style by default: its largest dimension that the
model axis divides is split over it), the examples over the data axis, and every
product is one SPMD program that XLA partitions (GSPMD): the Lanczos basis, probes and
eigenvectors are pytrees that keep the parameters' layout (`landscape._vectors`), so
no device ever holds the whole parameter vector.

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


def shard(op, devices=None, *, mesh: Mesh | None = None, param_specs=None,
          data_axis: str | tuple = "data", model_axis: str = "model"):
    """`op` with its examples split over `devices` (default: every device), or, given
    `mesh`, with its parameters sharded over the mesh as well.

    Works for any number of examples: `d·q` of them are split evenly, the last `r < d`
    are computed on every device and weighted `r/N`, so the operator is the same matrix
    to rounding. With the true Fisher, the sampled targets follow the per-device chunk
    layout, so they match an unsharded operator only when each device's share is a
    multiple of `chunk_size` and `chunk_size` divides that layout the same way.

    Parameter sharding (`mesh` given): every leaf of `op.params` is placed with
    `param_specs` (see `shard_params`; default FSDP-style over `model_axis`), the
    examples are split over `data_axis` (replicated when that axis is absent or does
    not divide their number), and products run as one partitioned program per call.
    `eigenvalues`, `trace`, `diagonal`, `density`, `per_block` keep every vector in the
    parameters' layout; `ls.memory.device_memory` reports per-device bytes.

    Example:
      >>> H = ls.shard(ls.hessian(loss_fn, params, (x, y), chunk_size=250))
      >>> ls.trace(H, key=jax.random.key(0)).value
      >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
      >>> H = ls.shard(ls.hessian(loss_fn, params, batch), mesh=mesh)
      >>> ls.eigenvalues(H, k=3, key=key).values
    """
    if not hasattr(op, "shards") or not hasattr(op, "batch"):
        raise ValueError("`op` must be a curvature operator with a batch (ls.hessian, "
                         f"ls.ggn, ls.fisher); got {type(op).__name__}.")
    if mesh is not None or param_specs is not None:
        if devices is not None:
            raise ValueError("pass either `devices` (examples only) or `mesh`, not both.")
        if mesh is None:
            raise ValueError("`param_specs` needs `mesh`, the mesh they refer to.")
        return _shard_params(op, mesh, param_specs, data_axis, model_axis)
    shards = (_mesh(devices), (AXIS,))
    return dataclasses.replace(op, params=replicate(op.params, shards),
                               batch=place_batch(op.batch, shards), shards=shards,
                               key=replicate(op.key, shards))


# ------------------------------------------------------- sharded parameters ---

@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a parameter-sharded operator lives: the mesh (axes made Auto) and the mesh
    axes its examples are split over (empty: the examples are replicated)."""

    mesh: Mesh
    data_axes: tuple[str, ...]

    def place_chunk(self, tree: Any, axis: int = 0) -> Any:
        """A sharding constraint putting dimension `axis` of every leaf on the data
        axes (when they divide it); inside jitted code only."""
        if not self.data_axes:
            return tree
        d = math.prod(self.mesh.shape[a] for a in self.data_axes)
        name = self.data_axes[0] if len(self.data_axes) == 1 else self.data_axes

        def one(x):
            if x.ndim <= axis or x.shape[axis] % d:
                return x
            spec = P(*([None] * axis), name)
            return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

        return jax.tree.map(one, tree)


def auto_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with Auto axis types (explicit axes forbid indexing sharded results)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"`mesh` must be a jax.sharding.Mesh (jax.make_mesh); got "
                         f"{type(mesh).__name__}.")
    if all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def fsdp_spec(shape: tuple, mesh: Mesh, axis: str) -> P:
    """The default parameter layout: the largest dimension that the size of mesh axis
    `axis` divides is split over it; a leaf with none stays replicated (biases, norms)."""
    size = mesh.shape[axis]
    dims = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in dims:
        if size > 1 and shape[i] % size == 0 and shape[i] >= size:
            return P(*([None] * i), axis)
    return P()


def _param_specs(params: Any, mesh: Mesh, param_specs, model_axis: str) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if param_specs is None:
        if model_axis not in mesh.axis_names:
            raise ValueError(f"`model_axis`={model_axis!r} is not an axis of the mesh "
                             f"{mesh.axis_names}; pass param_specs or model_axis.")
        specs = [fsdp_spec(np.shape(x), mesh, model_axis) for _, x in leaves]
    elif callable(param_specs):
        specs = [param_specs(jax.tree_util.keystr(path), x) for path, x in leaves]
    else:
        flat = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
        if len(flat) != len(leaves):
            raise ValueError(f"`param_specs` must hold one PartitionSpec per parameter "
                             f"leaf ({len(leaves)}); got {len(flat)}.")
        specs = flat
    for (path, _), spec in zip(leaves, specs):
        if not isinstance(spec, P):
            raise ValueError(f"`param_specs` must give a PartitionSpec for every leaf; "
                             f"got {spec!r} at {jax.tree_util.keystr(path)}.")
    return jax.tree_util.tree_unflatten(treedef, specs)


def shard_params(params: Any, mesh: Mesh, param_specs=None, *,
                 model_axis: str = "model") -> Any:
    """`params` placed over `mesh`, each leaf with its `PartitionSpec`.

    `param_specs`: None (FSDP-style: each leaf's largest dimension divisible by the
    `model_axis` size is split over it, the rest replicated), a pytree of
    `PartitionSpec` like params, or `fn(path, leaf) -> PartitionSpec` (tensor-parallel
    layouts the user's `apply_fn` is written for).

    Example:
      >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
      >>> params = ls.shard_params(params, mesh)
    """
    mesh = auto_mesh(mesh)
    specs = jax.tree.leaves(_param_specs(params, mesh, param_specs, model_axis),
                            is_leaf=lambda x: isinstance(x, P))
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [jax.device_put(x, NamedSharding(mesh, s))
                                        for x, s in zip(leaves, specs)])


def _place_examples(batch: Any, mesh: Mesh, data_axes: tuple[str, ...]) -> Any:
    if not _validate.is_concrete(batch):
        return batch
    d = math.prod(mesh.shape[a] for a in data_axes)
    spec = _spec(data_axes) if data_axes and _validate.num_examples(batch) % d == 0 else P()
    return jax.device_put(batch, NamedSharding(mesh, spec))


def _shard_params(op, mesh, param_specs, data_axis, model_axis):
    mesh = auto_mesh(mesh)
    if isinstance(data_axis, str):
        data_axes = (data_axis,) if data_axis in mesh.axis_names else ()
    else:
        data_axes = tuple(data_axis)
        for a in data_axes:
            if a not in mesh.axis_names:
                raise ValueError(f"`data_axis` {a!r} is not an axis of the mesh "
                                 f"{mesh.axis_names}.")
    params = shard_params(op.params, mesh, param_specs, model_axis=model_axis)
    key = None if op.key is None else jax.device_put(op.key, NamedSharding(mesh, P()))
    return dataclasses.replace(op, params=params, key=key,
                               batch=_place_examples(op.batch, mesh, data_axes),
                               shards=None, layout=Layout(mesh, data_axes))


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
