"""Stochastic trace and diagonal estimation with Rademacher probes.

Each estimate carries a standard error computed from the spread of its probes, so a
caller can tell how far to trust it. Probes are applied one at a time (`lax.map`):
on CPU that is faster than a `vmap` over them, and memory stays at one matvec.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from landscape import _validate


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


@functools.partial(jax.jit, static_argnames=("num_probes", "method"))
def _trace(op, key, *, num_probes, method):
    mv, flat = op.flat_matvec()
    n = flat.shape[0]
    if method == "hutchinson":
        z = jax.random.rademacher(key, (num_probes, n), flat.dtype)
        return _mean_and_error(jnp.sum(z * jax.lax.map(mv, z), axis=1)), op.value()
    # Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the top of the spectrum exactly on
    # a sketched subspace, Hutchinson on the deflated rest.
    sketch = num_probes // 3
    k_s, k_g = jax.random.split(key)
    s = jax.random.rademacher(k_s, (sketch, n), flat.dtype)
    q, _ = jnp.linalg.qr(jax.lax.map(mv, s).T)  # (n, sketch)
    exact = jnp.sum(q.T * jax.lax.map(mv, q.T))
    g = jax.random.rademacher(k_g, (num_probes - 2 * sketch, n), flat.dtype)
    g = g - (g @ q) @ q.T
    value, err = _mean_and_error(jnp.sum(g * jax.lax.map(mv, g), axis=1))
    return (exact + value, err), op.value()


def trace(op, *, key: jax.Array, num_probes: int = 100,
          method: str = "hutch++") -> TraceEstimate:
    """Trace of a symmetric operator from `num_probes` matvecs.

    `"hutchinson"`: mean of `zᵀAz` over Rademacher probes; variance
    `2(‖A‖_F² − Σ A_ii²)/num_probes`.
    `"hutch++"` (default): a third of the matvecs sketch the range of A, whose trace is
    taken exactly, and the rest run Hutchinson on the deflated remainder, which has far
    less variance when the spectrum is dominated by a few large eigenvalues (neural
    network curvature is). Needs `num_probes >= 3`.

    The standard error is the spread of the stochastic part's samples / √probes.

    Example:
      >>> tr = ls.trace(ls.hessian(loss_fn, params, batch), key=jax.random.key(0))
      >>> tr.value, tr.std_error
    """
    _validate.choice(method, "method", ("hutch++", "hutchinson"))
    num_probes = _validate.positive_int(num_probes, "num_probes")
    if method == "hutch++" and num_probes < 3:
        raise ValueError(f"method='hutch++' needs `num_probes` >= 3; got {num_probes}.")
    (value, err), loss = _trace(op, key, num_probes=num_probes, method=method)
    _validate.check_finite("The operator", value, loss)
    return TraceEstimate(value, err, num_probes)


@functools.partial(jax.jit, static_argnames=("num_probes",))
def _diagonal(op, key, *, num_probes):
    mv, flat = op.flat_matvec()
    z = jax.random.rademacher(key, (num_probes, flat.shape[0]), flat.dtype)
    return _mean_and_error(z * jax.lax.map(mv, z)), op.value()


def diagonal(op, *, key: jax.Array, num_probes: int = 100) -> DiagonalEstimate:
    """Diagonal of a symmetric operator: the mean of `z ⊙ Az` over Rademacher probes.

    Example:
      >>> d = ls.diagonal(H, key=jax.random.key(0), num_probes=200)
      >>> d.value["dense"]["kernel"]
    """
    num_probes = _validate.positive_int(num_probes, "num_probes")
    (value, err), loss = _diagonal(op, key, num_probes=num_probes)
    _validate.check_finite("The operator", value, loss)
    unravel = ravel_pytree(op.params)[1]
    return DiagonalEstimate(unravel(value), unravel(err))
