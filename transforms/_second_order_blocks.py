"""Blocking, Kronecker statistics and damped inverse roots shared by Shampoo and SOAP.

A parameter of shape `s` is viewed as a tensor of rank k >= 2 (dimensions of size 1
dropped; for rank > 2, adjacent dimensions merged while their product stays within
`block_size`), and each dimension larger than `block_size` is cut into the fewest
equal blocks of at most `block_size` (zero-padded at the end). All blocks of one
parameter share a shape, so a parameter's blocks are one array `(num_blocks, b_1, ...,
b_k)` and their statistics `(num_blocks, b_i, b_i)`, decomposed one matrix at a time
(see `_one_matrix_at_a_time`). Zero padding adds zero rows and columns to the statistics, which the damping
keeps invertible and which multiply zero entries of the gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class BlockPlan(NamedTuple):
    """Static description of how one parameter is cut into blocks."""

    shape: tuple[int, ...]        # the parameter's shape
    merged: tuple[int, ...]       # the tensor shape that is preconditioned
    num_blocks: tuple[int, ...]   # blocks along each merged dimension
    block: tuple[int, ...]        # block size along each merged dimension

    @property
    def preconditioned(self) -> bool:
        return len(self.merged) >= 2

    @property
    def total_blocks(self) -> int:
        return math.prod(self.num_blocks)

    @property
    def rank(self) -> int:
        return len(self.merged)


def merge_dims(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Drop size-1 dimensions; for rank > 2 merge neighbours whose product fits a block."""
    dims = [d for d in shape if d != 1]
    if len(dims) <= 2:
        return tuple(dims)
    out = [dims[0]]
    for d in dims[1:]:
        if out[-1] * d <= block_size:
            out[-1] *= d
        else:
            out.append(d)
    if len(out) < 2:  # everything fitted one block: keep a matrix rather than a vector
        out = [math.prod(dims[:-1]), dims[-1]]
    return tuple(out)


def make_plan(shape: tuple[int, ...], block_size: int) -> BlockPlan:
    merged = merge_dims(tuple(int(d) for d in shape), block_size)
    if len(merged) < 2:
        return BlockPlan(tuple(shape), merged, (), ())
    nb = tuple(-(-d // block_size) for d in merged)
    bs = tuple(-(-d // n) for d, n in zip(merged, nb))
    return BlockPlan(tuple(shape), merged, nb, bs)


def to_blocks(x: jax.Array, plan: BlockPlan) -> jax.Array:
    """`(total_blocks, b_1, ..., b_k)` view of a parameter-shaped array."""
    k = plan.rank
    x = x.reshape(plan.merged)
    pad = [(0, n * b - d) for d, n, b in zip(plan.merged, plan.num_blocks, plan.block)]
    if any(p[1] for p in pad):
        x = jnp.pad(x, pad)
    x = x.reshape([s for nb in zip(plan.num_blocks, plan.block) for s in nb])
    x = x.transpose(list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
    return x.reshape((plan.total_blocks,) + plan.block)


def from_blocks(xb: jax.Array, plan: BlockPlan) -> jax.Array:
    """Inverse of `to_blocks`: padding removed, original shape restored."""
    k = plan.rank
    x = xb.reshape(plan.num_blocks + plan.block)
    order = [j for i in range(k) for j in (i, k + i)]
    x = x.transpose(order).reshape([n * b for n, b in zip(plan.num_blocks, plan.block)])
    x = x[tuple(slice(0, d) for d in plan.merged)]
    return x.reshape(plan.shape)


def mode_statistic(xb: jax.Array, i: int) -> jax.Array:
    """`X_(i) X_(i)ᵀ` per block: the mode-i Gram matrix, `(total_blocks, b_i, b_i)`."""
    # one dot_general contracting every other axis: no transposed copy of the gradient
    others = tuple(d for d in range(1, xb.ndim) if d != 1 + i)
    return jax.lax.dot_general(xb, xb, ((others, others), ((0,), (0,))))


def mode_product(xb: jax.Array, m: jax.Array, i: int) -> jax.Array:
    """`X ×_i M` per block: `out[.., a, ..] = Σ_j M[a, j] X[.., j, ..]` along dimension i."""
    if i == xb.ndim - 2:   # the last axis: X Mᵀ lands in place
        return jax.lax.dot_general(xb, m, (((xb.ndim - 1,), (2,)), ((0,), (0,))))
    y = jax.lax.dot_general(m, xb, (((2,), (1 + i,)), ((0,), (0,))))
    return jnp.moveaxis(y, 1, 1 + i)


def identity_blocks(plan: BlockPlan, dtype) -> tuple[jax.Array, ...]:
    return tuple(jnp.broadcast_to(jnp.eye(b, dtype=dtype), (plan.total_blocks, b, b))
                 for b in plan.block)


def zero_blocks(plan: BlockPlan, dtype) -> tuple[jax.Array, ...]:
    return tuple(jnp.zeros((plan.total_blocks, b, b), dtype) for b in plan.block)


def _one_matrix_at_a_time(fn):
    """`fn` on one matrix, whose batched form (under `vmap`) is a sequential `lax.map`.

    Why: jaxlib's CPU kernels for a batch of matrices (`lapack_ssyevd_ffi` and friends)
    split the batch over XLA's intra-op thread pool (`ParallelBatchMap`) and block the
    calling pool thread until the pieces finish. Two such calls running at once on a
    2-thread pool each hold one thread and wait for work nobody is left to run: the
    vmapped Shampoo/SOAP groups hung so (gdb: both pool threads in
    `ParallelBatchMap` → `BlockingCounter::Wait`, every other thread idle in a futex
    wait). A single matrix runs inline in the calling thread, so looping over the batch
    here, whatever vmaps surround it, removes the cause.
    """
    single = jax.custom_batching.custom_vmap(fn)

    @single.def_vmap
    def _rule(axis_size, in_batched, *args):
        if not any(jax.tree.leaves(in_batched)):
            out = single(*args)
            return out, jax.tree.map(lambda _: False, out)
        args = [a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
                for a, b in zip(args, in_batched)]
        out = jax.lax.map(lambda a: single(*a), args)
        return out, jax.tree.map(lambda _: True, out)

    return single


@_one_matrix_at_a_time
def _eigh_one(x):
    v, w = jax.lax.linalg.eigh(x, symmetrize_input=False)
    return w, v


@_one_matrix_at_a_time
def _qr_one(x):
    return jnp.linalg.qr(x)[0]


@_one_matrix_at_a_time
def _damped_inverse_one(x, shift):
    # Cholesky, not an eigendecomposition: on CPU it is ~10x cheaper, and K-FAC's
    # factored damping needs nothing but the inverse. (F + sI)⁻¹ = L⁻ᵀ L⁻¹ from one
    # triangular inverse (n³/3) and one product, a third of a two-sided solve against I.
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    chol = jnp.linalg.cholesky(0.5 * (x + x.T) + shift * eye)
    inv_l = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    return inv_l.T @ inv_l


def damped_inverse(x: jax.Array, shift: jax.Array) -> jax.Array:
    """`(sym(x) + shift I)⁻¹` of one symmetric matrix by Cholesky; under `vmap` one
    LAPACK call per matrix (batched `potrf` deadlocked like batched `eigh`)."""
    return _damped_inverse_one(x, shift)


def _over_leading(fn, x):
    """`fn` of one matrix mapped over all leading dimensions of `x`, one at a time."""
    if x.ndim == 2:
        return fn(x)
    flat = x.reshape((-1,) + x.shape[-2:])
    out = jax.lax.map(fn, flat)
    return jax.tree.map(lambda o: o.reshape(x.shape[:-2] + o.shape[1:]), out)


def _eigh(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(w, v)` of symmetric matrices `(..., b, b)`, one LAPACK call per matrix.

    One seam for the decomposition (K-FAC uses it too), so tests can make it fail."""
    return _over_leading(_eigh_one, x)


def _qr(x: jax.Array) -> jax.Array:
    """Q of the QR decomposition of `(..., b, b)`, one LAPACK call per matrix."""
    return _over_leading(_qr_one, x)


def after(x, token):
    """`x`, available only once `token` is computed: orders LAPACK calls one after
    another, so that no two are ever in flight at once (XLA would otherwise run
    independent decompositions concurrently)."""
    if token is None:
        return x
    return jax.lax.optimization_barrier((x, token))[0]


def _finite_per_block(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x), axis=(-2, -1))


def inverse_root(stat: jax.Array, p: float, eps: float, previous: jax.Array) -> jax.Array:
    """`(S + eps I)^(-1/p)` per block from a symmetric eigendecomposition.

    Negative eigenvalues from round-off are clipped to 0 before damping. A block whose
    statistic or decomposition is not finite (float32 `eigh` can fail on badly
    conditioned matrices) keeps `previous`, so no NaN reaches the update.
    """
    sym = 0.5 * (stat + jnp.swapaxes(stat, -1, -2))
    ok_in = _finite_per_block(sym)
    sym = jnp.where(ok_in[:, None, None], sym, jnp.eye(sym.shape[-1], dtype=sym.dtype))
    w, v = _eigh(sym)
    scale = (jnp.maximum(w, 0.0) + eps) ** (-1.0 / p)
    root = (v * scale[:, None, :]) @ jnp.swapaxes(v, -1, -2)
    ok = ok_in & _finite_per_block(root)
    return jnp.where(ok[:, None, None], root, previous)


def eigenbasis(stat: jax.Array, previous: jax.Array) -> jax.Array:
    """Eigenvectors of each symmetric block (columns, eigenvalues descending); `previous`
    where the decomposition is not finite."""
    sym = 0.5 * (stat + jnp.swapaxes(stat, -1, -2))
    ok_in = _finite_per_block(sym)
    sym = jnp.where(ok_in[:, None, None], sym, jnp.eye(sym.shape[-1], dtype=sym.dtype))
    _, v = _eigh(sym)
    v = v[..., ::-1]
    ok = ok_in & _finite_per_block(v)
    return jnp.where(ok[:, None, None], v, previous)


def qr_power_step(stat: jax.Array, previous: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One power step `Q ← qr(S Q)` after sorting Q's columns by the Rayleigh quotients
    `diag(Qᵀ S Q)` (descending), as in SOAP. Returns the new basis and the sort order,
    which the caller applies to state kept in the eigenbasis."""
    est = jnp.einsum("nji,njk,nki->ni", previous, stat, previous)
    order = jnp.argsort(-est, axis=-1)
    q = jnp.take_along_axis(previous, order[:, None, :], axis=-1)
    q = _qr(stat @ q)
    ok = _finite_per_block(q)
    q = jnp.where(ok[:, None, None], q, previous)
    order = jnp.where(ok[:, None], order, jnp.arange(order.shape[-1])[None, :])
    return q, order


def schedule(count: jax.Array, step, start: int, every: int) -> tuple[jax.Array, jax.Array]:
    """`(t, refresh)`: the step number and whether this step refreshes.

    `t` is `step` when the caller supplies it (the global step count, shared by every
    member of a vmapped group, so `refresh` stays unbatched and its `lax.cond` a real
    branch) and the state's own `count` otherwise."""
    t = count if step is None else jnp.asarray(step).astype(count.dtype)
    return t, (t >= start) & ((t - start) % every == 0)


def is_traced(value) -> bool:
    """True for arrays and tracers: hyper-parameters that are checked where they are
    made, not by the builder (they may be swept under `vmap`)."""
    return isinstance(value, (jax.Array, jax.core.Tracer))


def checked(check_fn, value, name, *args):
    """`check_fn(value, name, *args)` for a static value; arrays and tracers (swept
    hyper-parameters, whose values are not known here) pass unchecked."""
    return value if is_traced(value) else check_fn(value, name, *args)


def descent(scaling: optax.GradientTransformation, learning_rate, weight_decay
            ) -> optax.GradientTransformation:
    """`scaling`, then decoupled weight decay (as `optax.adamw`; left out when it is a
    literal 0, so `update` needs no `params`), then the step −learning_rate."""
    parts = [scaling]
    if is_traced(weight_decay) or weight_decay != 0:
        parts.append(optax.add_decayed_weights(weight_decay))
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def check_block_size(block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
            or block_size < 2:
        raise ValueError(f"`block_size` must be an integer >= 2; got {block_size!r}.")
    return int(block_size)
