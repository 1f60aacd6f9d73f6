"""The Hessian index: the fraction of negative (and of near-zero) eigenvalues.

At a critical point the index says what kind it is: 0 for a minimum, above 0 for a
saddle (Dauphin et al. 2014, "Identifying and attacking the saddle point problem").
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from landscape import _validate
from landscape.spectrum import density


class HessianIndex(NamedTuple):
    """Fractions of the spectrum below `-tol` (`negative`) and within `±tol`
    (`near_zero`), with standard errors across probes (zero on the dense path)."""

    negative: jax.Array
    near_zero: jax.Array
    negative_std_error: jax.Array
    near_zero_std_error: jax.Array
    tol: jax.Array


def _fractions(nodes, weights, tol):
    neg = jnp.sum(weights * (nodes < -tol), axis=-1)
    zero = jnp.sum(weights * (jnp.abs(nodes) <= tol), axis=-1)
    return neg, zero


def hessian_index(op, *, key: jax.Array | None = None, method: str = "density",
                  tol: float | None = None, rtol: float = 1e-3, num_probes: int = 10,
                  num_steps: int = 80) -> HessianIndex:
    """The index of a symmetric operator (any Basin operator: `hessian`, a block, ...).

    `method="dense"` takes every eigenvalue of `op.dense()` (exact; small models only).
    `method="density"` reads the fractions off a stochastic Lanczos quadrature
    (`ls.density`): each probe's quadrature gives one estimate, the result is their mean
    and the standard error their spread. The quadrature smears each eigenvalue over the
    Ritz values around it, so eigenvalues closer to ±`tol` than the Ritz spacing may be
    counted on the wrong side: a bias the standard error does not include.

    Args:
      tol: the half-width of "near zero", absolute. Default: `rtol` times the largest
        |eigenvalue| (the largest |Ritz value| on the density path).

    Example:
      >>> idx = ls.hessian_index(ls.hessian(loss_fn, params, batch), key=key)
      >>> idx.negative, idx.negative_std_error
    """
    method = _validate.choice(method, "method", ("density", "dense"))
    if tol is not None and not tol >= 0:
        raise ValueError(f"`tol` must be a number >= 0; got {tol!r}.")
    if not rtol >= 0:
        raise ValueError(f"`rtol` must be a number >= 0; got {rtol!r}.")
    if method == "dense":
        eigs = jnp.linalg.eigvalsh(op.dense())
        t = jnp.asarray(rtol * jnp.max(jnp.abs(eigs)) if tol is None else tol, eigs.dtype)
        weights = jnp.full_like(eigs, 1.0 / eigs.shape[0])
        neg, zero = _fractions(eigs, weights, t)
        return HessianIndex(neg, zero, jnp.zeros_like(neg), jnp.zeros_like(zero), t)
    if key is None:
        raise ValueError("`key` is required for method='density'.")
    den = density(op, key=key, num_probes=num_probes, num_steps=num_steps)
    t = jnp.asarray(rtol * jnp.max(jnp.abs(den.nodes)) if tol is None else tol,
                    den.nodes.dtype)
    neg, zero = _fractions(den.nodes, den.weights, t)
    p = neg.shape[0]
    err = (lambda f: jnp.std(f, ddof=1) / np.sqrt(p)) if p > 1 else (
        lambda f: jnp.full((), jnp.nan, f.dtype))
    return HessianIndex(neg.mean(), zero.mean(), err(neg), err(zero), t)
