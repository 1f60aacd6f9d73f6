"""Vector arithmetic on parameter pytrees, and on stacks of them (a leading axis).

Lanczos bases, probes and eigenvectors stay pytrees shaped like the parameters, so
each leaf keeps the layout the parameters have: when the parameters are sharded over
a mesh (`ls.shard(op, mesh=..., param_specs=...)`), nothing here gathers them into one
replicated flat vector. Inner products reduce leaf by leaf (XLA adds one all-reduce of
a scalar, or of a small `(m,)` vector, per product).

A stack is a pytree whose leaves carry a leading axis of the same length m (row i is
the pytree `tree.map(lambda x: x[i], stack)`). A plain array is a pytree with one
leaf, so every function works on flat vectors and `(m, n)` matrices as well, with the
same random draws as `jax.random` on that array.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def leaves(tree: Any) -> list:
    return jax.tree.leaves(tree)


def dot(a: Any, b: Any) -> jax.Array:
    """⟨a, b⟩ summed over leaves."""
    return sum(jnp.vdot(x, y) for x, y in zip(leaves(a), leaves(b)))


def norm(a: Any) -> jax.Array:
    return jnp.sqrt(dot(a, a))


def axpy(alpha: Any, x: Any, y: Any) -> Any:
    """alpha·x + y."""
    return jax.tree.map(lambda u, v: alpha * u + v, x, y)


def scale(alpha: Any, x: Any) -> Any:
    return jax.tree.map(lambda u: alpha * u, x)


def sub(a: Any, b: Any) -> Any:
    return jax.tree.map(jnp.subtract, a, b)


def zeros(like: Any, rows: int | None = None) -> Any:
    """Zeros shaped like `like` (with a leading axis of `rows` when given)."""
    lead = () if rows is None else (rows,)
    return jax.tree.map(lambda p: jnp.zeros(lead + jnp.shape(p), jnp.result_type(p)), like)


def _split_dim(p: Any):
    s = getattr(p, "sharding", None)
    if not isinstance(s, NamedSharding):
        return ()
    split = []
    for d, entry in enumerate(s.spec):
        names = entry if isinstance(entry, tuple) else (entry,)
        parts = math.prod(s.mesh.shape[a] for a in names if a is not None)
        if parts > 1:
            split.append((d, parts, NamedSharding(s.mesh, P(entry))))
    return () if not split else (split[0] if len(split) == 1 else None)


def split_dims(tree: Any) -> tuple:
    """For each leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s, outside of jit):
    `(dim, parts, sharding)` for the one dimension its `NamedSharding` splits, `()`
    when nothing is split, None when several dimensions are. Hashable: a static
    argument of the jitted routines that use `flat_layout`."""
    return tuple(_split_dim(p) for p in leaves(tree))


def flat_layout(like: Any, splits: tuple | None = None) -> tuple[Any, Any]:
    """`(to_flat, to_shaped)` for vectors and stacks shaped like `like`: each leaf as
    a flat vector, and back (the tree structure stays; stacks keep their leading axes).

    `splits` (`split_dims` of the parameters, taken outside of jit; default: nothing
    split) says how each leaf is placed. A leaf on one device, or replicated, is
    flattened in its own order. A leaf whose sharding splits one dimension into
    `parts` is flattened shard after shard (the split dimension moved first), so the
    flat vector is split evenly over the same devices, each holding its own shard: the
    reshape moves no data. A leaf split over several dimensions keeps its shape.

    Loops that carry a basis keep it in this layout: XLA handles loop-carried stacks
    of matrix-shaped leaves poorly. On CPU, products with a 31-row basis of `(m, a, b)`
    leaves ran 7× slower than with `(m, a·b)` rows, and a program partitioned over 8
    devices held 4.3 basis-sized buffers per device where it now holds 1.4.
    """
    kinds = splits if splits is not None else tuple(() for _ in leaves(like))
    treedef = jax.tree.structure(like)
    shapes = [tuple(jnp.shape(p)) for p in leaves(like)]

    def to_flat(tree):
        out = []
        for x, kind, shape in zip(leaves(tree), kinds, shapes):
            lead = x.shape[:x.ndim - len(shape)]
            if kind is None:
                out.append(x)
            elif kind == ():
                out.append(x.reshape(lead + (-1,)))
            else:
                d, parts, sharding = kind
                y = x.reshape(lead + shape[:d] + (parts, shape[d] // parts) + shape[d + 1:])
                y = jnp.moveaxis(y, len(lead) + d, len(lead)).reshape(lead + (-1,))
                spec = P(*((None,) * len(lead)), *sharding.spec)
                out.append(jax.lax.with_sharding_constraint(
                    y, NamedSharding(sharding.mesh, spec)))
        return jax.tree.unflatten(treedef, out)

    def to_shaped(tree):
        out = []
        for x, kind, shape in zip(leaves(tree), kinds, shapes):
            if kind is None:
                out.append(x)
                continue
            lead = x.shape[:-1]
            if kind == ():
                out.append(x.reshape(lead + shape))
                continue
            d, parts, _ = kind
            y = x.reshape(lead + (parts,) + shape[:d] + (shape[d] // parts,) + shape[d + 1:])
            out.append(jnp.moveaxis(y, len(lead), len(lead) + d).reshape(lead + shape))
        return jax.tree.unflatten(treedef, out)

    return to_flat, to_shaped


def row(stack: Any, i) -> Any:
    return jax.tree.map(lambda x: x[i], stack)


def set_row(stack: Any, i, v: Any) -> Any:
    """Row `i` of `stack` replaced by `v`: a dynamic-update-slice (in place inside a
    loop; `.at[i].set` is a scatter, which a partitioned program copies around)."""
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(
        s, x.astype(s.dtype), i, 0), stack, v)


def stack_rows(trees: list) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def concat(a: Any, b: Any) -> Any:
    """Two stacks, one after the other."""
    return jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)


def coefficients(stack: Any, v: Any) -> jax.Array:
    """`(m,)` inner products of each row of `stack` with `v` (B @ v)."""
    return sum(jnp.tensordot(s, x, axes=x.ndim) for s, x in zip(leaves(stack), leaves(v)))


def gram(a: Any, b: Any) -> jax.Array:
    """`(m_a, m_b)` inner products between the rows of two stacks (A Bᵀ)."""
    return sum(jnp.tensordot(x, y, axes=(tuple(range(1, x.ndim)),) * 2)
               for x, y in zip(leaves(a), leaves(b)))


def combine(c: jax.Array, stack: Any) -> Any:
    """Σ_r c[r] · row r: `c` of shape `(m,)` gives one pytree; `(m, k)` gives a stack
    of k (cᵀ B)."""
    return jax.tree.map(lambda s: jnp.tensordot(c, s, axes=(0, 0)) if c.ndim == 1
                        else jnp.tensordot(c.T, s, axes=1), stack)


def _project_out(stack: Any, w: Any) -> Any:
    """One classical Gram-Schmidt pass: `w` minus its projection on the rows."""
    return sub(w, combine(coefficients(stack, w), stack))


def orthogonalize(stack: Any, w: Any) -> Any:
    """`w` minus its projection on the rows of `stack` (orthonormal rows, or zero
    rows), by two classical Gram-Schmidt passes."""
    return _project_out(stack, _project_out(stack, w))


def reorthogonalize(stack: Any, w: Any, eta: float = 0.5 ** 0.5) -> Any:
    """`orthogonalize` with the second pass only where it is needed: one classical
    Gram-Schmidt pass, and another when the first removed more than `1 − eta²` of
    `w`'s squared norm (the Daniel-Gragg-Kaufman-Stewart criterion). In Lanczos the
    recurrence leaves `w` nearly orthogonal already, so most steps take one pass."""
    before = norm(w)
    w = _project_out(stack, w)
    return jax.lax.cond(norm(w) < eta * before, lambda x: _project_out(stack, x),
                        lambda x: x, w)


def orthogonalize_rows(stack: Any, rows: Any) -> Any:
    """Each row of the stack `rows` orthogonalized against `stack` (two passes)."""
    for _ in range(2):
        rows = sub(rows, combine(gram(stack, rows), stack))
    return rows


def orthonormal_rows(rows: Any) -> Any:
    """An orthonormal stack spanning the rows of `rows` (rows that add nothing new are
    zero), by two passes of the Gram matrix's eigendecomposition."""
    for _ in range(2):
        g = gram(rows, rows)
        s, u = jnp.linalg.eigh(g)
        keep = s > jnp.finfo(g.dtype).eps * rows_count(g) * jnp.maximum(s[-1], 0.0)
        rows = combine(jnp.where(keep, u / jnp.sqrt(jnp.where(keep, s, 1.0)), 0.0), rows)
    return rows


def rows_count(g: jax.Array) -> int:
    return g.shape[0]


def normal(key: jax.Array, like: Any, rows: int | None = None) -> Any:
    """Standard normal draws shaped like `like` (one key per leaf; a single array uses
    `key` itself, as `jax.random.normal(key, shape)` would)."""
    return _draw(jax.random.normal, key, like, rows)


def rademacher(key: jax.Array, like: Any, rows: int | None = None) -> Any:
    return _draw(jax.random.rademacher, key, like, rows)


def _draw(fn, key, like, rows):
    flat, treedef = jax.tree.flatten(like)
    keys = [key] if len(flat) == 1 else list(jax.random.split(key, len(flat)))
    lead = () if rows is None else (rows,)
    return jax.tree.unflatten(treedef, [
        fn(k, lead + jnp.shape(p), jnp.result_type(p)) for k, p in zip(keys, flat)])


def row_norms(stack: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(x.reshape(x.shape[0], -1) ** 2, axis=1)
                        for x in leaves(stack)))
