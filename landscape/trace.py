"""Stochastic trace and diagonal estimation with Rademacher probes.

Each estimate carries a standard error computed from the spread of its probes, so a
caller can tell how far to trust it. The operator is prepared once (`ls.prepared`: one
linearization, reused by every probe when it fits the memory budget) and applied to
blocks of `block_size` probes at a time (`lax.map` with `batch_size`: a `vmap` inside a
block, so an accelerator sees matrix-matrix work). The blocks change how the products
are scheduled, never which probes are drawn: the values are the probe-at-a-time ones.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from landscape import _bytes, _validate
from landscape import _vectors as V
from landscape.operators import MODES, prepared, product_bytes


class TraceEstimate(NamedTuple):
    """`value` ± `std_error` (one standard error), from `num_matvecs` matvecs."""

    value: jax.Array
    std_error: jax.Array
    num_matvecs: int


class DiagonalEstimate(NamedTuple):
    """Diagonal estimate and per-entry standard error, pytrees shaped like params."""

    value: Any
    std_error: Any


def _mean_and_error(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    p = samples.shape[0]
    err = jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(p) if p > 1 else jnp.full_like(
        samples[0], jnp.nan)
    return samples.mean(0), err


def block_size_for(op, num_probes: int, block_size: int | None = None,
                   budget: int | None = None) -> int:
    """Probes per block: `block_size` if given, else as many as `budget` bytes hold.

    Each probe in a block carries its own tangents through the model, about
    `ls.operators.product_bytes(op)` bytes. On a CPU the default is one probe at a
    time: there a `vmap` over tangents was measured slower than a loop
    (benchmarks/RESULTS.md, `bench_memory`), while accelerators gain from the blocks.

    Example:
      >>> from landscape.trace import block_size_for
      >>> block_size_for(H, 100, budget=2**30)
    """
    num_probes = _validate.positive_int(num_probes, "num_probes")
    if block_size is not None:
        return min(_validate.positive_int(block_size, "block_size"), num_probes)
    if budget is None:
        if jax.default_backend() == "cpu":
            return 1
        budget = _bytes.default_budget()
    return int(max(1, min(num_probes, budget // max(product_bytes(op), 1))))


def _apply(mv, z: Any, block: int) -> Any:
    """`mv` of every row of the stack `z` (pytrees), `block` rows at a time."""
    block = min(block, V.leaves(z)[0].shape[0])
    return jax.lax.map(mv, z, batch_size=block if block > 1 else None)


def row_dots(a: Any, b: Any) -> jax.Array:
    """`(m,)`: ⟨a_i, b_i⟩ for the rows of two stacks."""
    return sum(jnp.sum((x * y).reshape(x.shape[0], -1), axis=1)
               for x, y in zip(V.leaves(a), V.leaves(b)))


def _check(mode, budget):
    _validate.choice(mode, "mode", MODES)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget <= 0):
        raise ValueError(f"`budget` must be a positive number of bytes; got {budget!r}.")


@functools.partial(jax.jit, static_argnames=("num_probes", "method", "block", "mode",
                                             "budget"))
def _trace(op, key, *, num_probes, method, block, mode, budget):
    mv = prepared(op, mode, budget).matvec
    if method == "hutchinson":
        z = V.rademacher(key, op.params, num_probes)
        return _mean_and_error(row_dots(z, _apply(mv, z, block))), op.value()
    # Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the top of the spectrum exactly on
    # a sketched subspace, Hutchinson on the deflated rest.
    sketch = num_probes // 3
    k_s, k_g = jax.random.split(key)
    s = V.rademacher(k_s, op.params, sketch)
    q = V.orthonormal_rows(_apply(mv, s, block))  # an orthonormal basis of A S
    exact = jnp.sum(row_dots(q, _apply(mv, q, block)))
    g = V.orthogonalize_rows(q, V.rademacher(k_g, op.params, num_probes - 2 * sketch))
    value, err = _mean_and_error(row_dots(g, _apply(mv, g, block)))
    return (exact + value, err), op.value()


def trace(op, *, key: jax.Array, num_probes: int = 100, method: str = "hutch++",
          block_size: int | None = None, mode: str = "auto",
          budget: int | None = None) -> TraceEstimate:
    """Trace of a symmetric operator from `num_probes` matvecs.

    `"hutchinson"`: mean of `zᵀAz` over Rademacher probes; variance
    `2(‖A‖_F² − Σ A_ii²)/num_probes`.
    `"hutch++"` (default): a third of the matvecs sketch the range of A, whose trace is
    taken exactly, and the rest run Hutchinson on the deflated remainder, which has far
    less variance when the spectrum is dominated by a few large eigenvalues (neural
    network curvature is). Needs `num_probes >= 3`.

    The standard error is the spread of the stochastic part's samples / √probes.

    Args:
      op: any operator (`hessian`, `ggn`, `fisher`, a block, a `LinearOperator`).
      key: PRNG key for the probes.
      num_probes: matvecs in all.
      method: `"hutch++"` or `"hutchinson"`.
      block_size: probes applied together (`block_size_for`: one on CPU, as many as
        `budget` holds on an accelerator); the estimate does not depend on it.
      mode, budget: how the operator is prepared for its many products
        (`ls.prepared`: `"auto"` linearizes once when the residuals fit `budget` bytes).

    Example:
      >>> tr = ls.trace(ls.hessian(loss_fn, params, batch), key=jax.random.key(0))
      >>> tr.value, tr.std_error
    """
    _validate.choice(method, "method", ("hutch++", "hutchinson"))
    num_probes = _validate.positive_int(num_probes, "num_probes")
    if method == "hutch++" and num_probes < 3:
        raise ValueError(f"method='hutch++' needs `num_probes` >= 3; got {num_probes}.")
    _check(mode, budget)
    block = block_size_for(op, num_probes, block_size, budget)
    (value, err), loss = _trace(op, key, num_probes=num_probes, method=method,
                                block=block, mode=mode, budget=budget)
    _validate.check_finite("The operator", value, loss)
    return TraceEstimate(value, err, num_probes)


@functools.partial(jax.jit, static_argnames=("num_probes", "block", "mode", "budget"))
def _diagonal(op, key, *, num_probes, block, mode, budget):
    mv = prepared(op, mode, budget).matvec
    z = V.rademacher(key, op.params, num_probes)
    az = _apply(mv, z, block)
    mean_err = jax.tree.map(lambda a, b: _mean_and_error(a * b), z, az)
    return (jax.tree.map(lambda p, me: me[0], op.params, mean_err),
            jax.tree.map(lambda p, me: me[1], op.params, mean_err)), op.value()


def diagonal(op, *, key: jax.Array, num_probes: int = 100, block_size: int | None = None,
             mode: str = "auto", budget: int | None = None) -> DiagonalEstimate:
    """Diagonal of a symmetric operator: the mean of `z ⊙ Az` over Rademacher probes
    (Bekas, Kokiopoulou & Saad 2007). `block_size`, `mode` and `budget` as in `trace`.

    Example:
      >>> d = ls.diagonal(H, key=jax.random.key(0), num_probes=200)
      >>> d.value["layers"][0]["kernel"]
    """
    num_probes = _validate.positive_int(num_probes, "num_probes")
    _check(mode, budget)
    block = block_size_for(op, num_probes, block_size, budget)
    (value, err), loss = _diagonal(op, key, num_probes=num_probes, block=block, mode=mode,
                                   budget=budget)
    _validate.check_finite("The operator", value, loss)
    return DiagonalEstimate(value, err)
