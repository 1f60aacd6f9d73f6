"""Block heterogeneity of the Hessian: how different the blocks' spectra are.

Zhang et al., "Why Transformers Need Adam: A Hessian Perspective" (2024,
arXiv:2402.16788) find that the blockwise Hessian spectra of transformers differ a lot
from block to block at initialization, while those of CNNs look alike, and that the
average Jensen–Shannon distance between the blocks' spectra (their JS⁰) predicts where
SGD falls behind Adam. `block_heterogeneity` computes that number from the per-block
spectral densities that `ls.per_block(..., density=True)` estimates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from landscape import _validate
from landscape.spectrum import Density, _smooth


class BlockHeterogeneity(NamedTuple):
    """JS⁰ and what it is made of.

    js0: the mean Jensen–Shannon distance over all pairs of distinct blocks.
    distances: `(B, B)` symmetric matrix of pairwise distances, zero diagonal.
    names: the blocks, in the order of the rows.
    grid: `(G,)` eigenvalue grid shared by every block.
    probabilities: `(B, G)`, each block's smoothed density on `grid`, normalized to sum
      to 1 (the discrete distributions the distances compare).
    sigma: the Gaussian smoothing width.
    """

    js0: jnp.ndarray
    distances: jnp.ndarray
    names: tuple[str, ...]
    grid: jnp.ndarray
    probabilities: jnp.ndarray
    sigma: jnp.ndarray


def _densities(report_or_densities: Any) -> tuple[tuple[str, ...], list[Density]]:
    items = report_or_densities
    if isinstance(items, dict):
        pairs = list(items.items())
    elif isinstance(items, (list, tuple)) and not isinstance(items, Density):
        pairs = [(str(i), d) for i, d in enumerate(items)]
    else:
        raise ValueError("`report_or_densities` must be `ls.per_block`'s report (a dict of "
                         "BlockReport), a dict of ls.Density, or a list of ls.Density; got "
                         f"{type(items).__name__}.")
    names, dens = [], []
    for name, d in pairs:
        d = getattr(d, "density", d) if not isinstance(d, Density) else d
        if not isinstance(d, Density):
            raise ValueError(f"Block {name!r} of `report_or_densities` has no spectral "
                             "density; call ls.per_block(..., density=True).")
        names.append(name)
        dens.append(d)
    if len(dens) < 2:
        raise ValueError("`report_or_densities` needs at least two blocks to compare; "
                         f"got {len(dens)}.")
    return tuple(names), dens


def js_distance(p: jnp.ndarray, q: jnp.ndarray) -> jnp.ndarray:
    """Jensen–Shannon distance √(½ KL(p‖m) + ½ KL(q‖m)), m = ½(p + q), natural log
    (at most √ln 2), between discrete distributions on the last axis (normalized here),
    as `scipy.spatial.distance.jensenshannon`."""
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    q = q / jnp.sum(q, axis=-1, keepdims=True)
    m = 0.5 * (p + q)

    def kl(a):
        # 0 log 0 = 0; `m` can underflow to 0 where `a` is subnormal (½ of the smallest
        # float32), a term too small to count, so it is dropped as well.
        keep = (a > 0) & (m > 0)
        return jnp.sum(jnp.where(keep, a * (jnp.log(jnp.where(keep, a, 1.0)) -
                                            jnp.log(jnp.where(keep, m, 1.0))), 0.0), -1)

    return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(q), 0.0))


def block_heterogeneity(report_or_densities: Any, *, grid: Any = None,
                        sigma: float | None = None,
                        num_points: int = 1000) -> BlockHeterogeneity:
    """JS⁰, the mean pairwise Jensen–Shannon distance between blocks' Hessian spectra.

    Zhang et al. 2024 (arXiv:2402.16788) define JS⁰ as the average Jensen–Shannon
    distance between the spectral densities of each pair of parameter blocks at
    initialization, the densities estimated by stochastic Lanczos quadrature. What is
    computed here, exactly:

    1. every block's SLQ quadrature (`Density.nodes`, `.weights`) is smoothed by one
       Gaussian of width `sigma` and evaluated on one `grid` shared by all blocks
       (default: `num_points` evenly spaced points from the smallest node minus 5σ to
       the largest plus 5σ over all blocks, σ = 1% of that node range, as `ls.density`
       does for one operator); a shared grid and width make the blocks comparable;
    2. each block's values on the grid are normalized to sum to 1;
    3. the JS *distance* (the square root of the JS divergence, natural log, so in
       [0, √ln 2 ≈ 0.833]) is taken for every pair of distinct blocks, and JS⁰ is the
       mean over the B(B − 1)/2 pairs.

    The spectra are compared as they are, not rescaled (Zhang et al. rescale theirs
    only to draw them in one figure), so blocks whose eigenvalues differ in scale count
    as heterogeneous. JS⁰ depends on the SLQ settings and on σ: compare models at the
    same settings.

    Args:
      report_or_densities: `ls.per_block(H, ..., density=True)`'s report, or a dict /
        list of `ls.Density`.
      grid: optional 1-D eigenvalue grid to use instead of the default.
      sigma: optional smoothing width (> 0).
      num_points: points of the default grid.

    Example:
      >>> H = ls.hessian(loss_fn, params_at_init, batch)
      >>> rep = ls.per_block(H, key=jax.random.key(0), density=True)
      >>> het = ls.block_heterogeneity(rep)
      >>> float(het.js0), het.names
    """
    names, dens = _densities(report_or_densities)
    nodes = jnp.concatenate([d.nodes.ravel() for d in dens])
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    width = jnp.maximum(hi - lo, jnp.finfo(nodes.dtype).eps * jnp.maximum(1.0, jnp.abs(hi)))
    if sigma is None:
        sigma = 0.01 * width
    elif not sigma > 0:
        raise ValueError(f"`sigma` must be positive; got {sigma!r}.")
    if grid is None:
        num_points = _validate.positive_int(num_points, "num_points")
        grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    else:
        grid = jnp.asarray(grid, nodes.dtype)
        if grid.ndim != 1 or grid.shape[0] < 2:
            raise ValueError(f"`grid` must be a 1-D array of at least 2 points; got shape "
                             f"{grid.shape}.")
    mass, probs, dist, js0 = _compare(tuple(d.nodes for d in dens),
                                      tuple(d.weights for d in dens), grid, sigma)
    _validate.check_finite("The densities", probs)
    if _validate.is_concrete(mass) and np.any(np.asarray(mass) <= 0):
        raise ValueError("A block's density has no mass on `grid`; widen the grid.")
    return BlockHeterogeneity(js0, dist, names, grid, probs, jnp.asarray(sigma))


@jax.jit
def _compare(nodes, weights, grid, sigma):
    values = jnp.stack([_smooth(n, w, grid, sigma) for n, w in zip(nodes, weights)])
    mass = jnp.sum(values, axis=1, keepdims=True)
    probs = values / jnp.where(mass > 0, mass, 1.0)
    b = len(nodes)
    dist = js_distance(probs[:, None, :], probs[None, :, :]) * (1 - jnp.eye(b))
    return mass, probs, dist, jnp.sum(dist) / (b * (b - 1))
