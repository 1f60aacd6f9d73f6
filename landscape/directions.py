"""Directions in parameter space for slicing the loss surface.

- `random_direction`: a Gaussian pytree like params.
- `filter_normalize` / `filter_normalized_direction`: Li et al. 2018 ("Visualizing the
  Loss Landscape of Neural Nets"): each filter of the direction is rescaled to the norm
  of the same filter of the weights, so that surfaces of networks with different
  weight scales (batch norm, weight decay) are comparable.
- `pca_directions`: the top principal directions of an optimization trajectory, with
  the trajectory's coordinates in them (Li et al. 2018, section 7).

A *filter* is the slice of a tensor at one index of `filter_axis`: by the JAX / Flax
convention (`Dense` kernels `(in, out)`, `Conv` kernels `(..., in, out)`) the last
axis, i.e. one output neuron or channel. Pass `filter_axis=0` for PyTorch's layout.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from landscape import _validate


def random_direction(key: jax.Array, params: Any) -> Any:
    """A direction with i.i.d. standard normal entries, a pytree like `params`.

    Example:
      >>> d = ls.random_direction(jax.random.key(0), params)
    """
    if not jax.tree.leaves(params):
        raise ValueError("`params` has no array leaves.")
    return optax.tree.random_like(key, params)


def filter_normalize(direction: Any, params: Any, *, zero_bias: bool = True,
                     filter_axis: int = -1, eps: float = 1e-10) -> Any:
    """Rescale each filter of `direction` to the norm of the matching filter of `params`.

    For a leaf with two or more axes, every slice along `filter_axis` (one output
    neuron of a dense layer, one output channel of a convolution) becomes
    `d_f / ‖d_f‖ · ‖w_f‖`. Leaves with fewer than two axes (biases, normalization
    scales and offsets) get a zero direction when `zero_bias` is True, as in Li et al.'s
    plots; otherwise they are treated as one filter each.

    Args:
      direction: pytree like `params`.
      params: the weights whose filter norms are copied.
      zero_bias: zero the direction of 0-D and 1-D leaves.
      filter_axis: the axis indexing filters (default -1, the JAX/Flax convention).
      eps: added to ‖d_f‖ so all-zero filters stay zero.

    Example:
      >>> d = ls.filter_normalize(ls.random_direction(key, params), params)
    """
    _validate.same_structure(direction, params, name="direction")

    def one(d, w):
        d = jnp.asarray(d, jnp.result_type(w))
        if jnp.ndim(w) < 2:
            if zero_bias:
                return jnp.zeros_like(w)
            return d / (jnp.linalg.norm(d) + eps) * jnp.linalg.norm(w)
        axis = filter_axis % jnp.ndim(w)
        others = tuple(a for a in range(jnp.ndim(w)) if a != axis)
        dn = jnp.sqrt(jnp.sum(d**2, axis=others, keepdims=True))
        wn = jnp.sqrt(jnp.sum(w**2, axis=others, keepdims=True))
        return d / (dn + eps) * wn

    if not isinstance(filter_axis, (int, np.integer)):
        raise ValueError(f"`filter_axis` must be an integer; got {filter_axis!r}.")
    return jax.tree.map(one, direction, params)


def filter_normalized_direction(key: jax.Array, params: Any, *, zero_bias: bool = True,
                                filter_axis: int = -1) -> Any:
    """A random Gaussian direction, filter-normalized to `params` (Li et al. 2018).

    Example:
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> dx = ls.filter_normalized_direction(k1, params)
      >>> dy = ls.filter_normalized_direction(k2, params)
      >>> surf = ls.surface_2d(loss_fn, params, (dx, dy), (x, y))
    """
    return filter_normalize(random_direction(key, params), params, zero_bias=zero_bias,
                            filter_axis=filter_axis)


class PCADirections(NamedTuple):
    """Principal directions of a trajectory.

    directions: pytree like params with a leading axis of length k, orthonormal;
    explained_variance_ratio: `(k,)`, the fraction of the trajectory's variance each
    direction carries; coordinates: `(T, k)`, each point's offset from `origin`
    projected on the directions (the path to draw over a `surface_2d` contour);
    origin: the point the coordinates are measured from (the trajectory's last point
    unless given).
    """

    directions: Any
    explained_variance_ratio: jax.Array
    coordinates: jax.Array
    origin: Any


def pca_directions(trajectory: Any, *, k: int = 2, origin: Any = None) -> PCADirections:
    """Top-k principal directions of the offsets of a trajectory from its end point.

    Li et al. 2018 (section 7): random directions in high dimension are nearly
    orthogonal to an optimization path, so a path is drawn on the plane of the first
    two principal components of the matrix [θ_i − θ_T], where it moves the most. The
    offsets are centred before the SVD, as in their PCA.

    Args:
      trajectory: pytree like params with a leading axis of T ≥ 2 saved points.
      k: number of directions (at most T − 1).
      origin: pytree like params to measure from (default the last point).

    Example:
      >>> pca = ls.pca_directions(saved_params, k=2)
      >>> surf = ls.surface_2d(loss_fn, pca.origin, pca.directions, (x, y))
      >>> ls_plot.contour(surf, trajectory=pca.coordinates)
    """
    leaves = jax.tree.leaves(trajectory)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("`trajectory` must be a pytree like params with a leading "
                         "axis of saved points.")
    t = _validate.num_examples(trajectory, "trajectory")
    k = _validate.positive_int(k, "k")
    if t < 2 or k > t - 1:
        raise ValueError(f"`k`={k} needs a trajectory of at least k+1 points; got {t}.")
    last = jax.tree.map(lambda x: x[-1], trajectory)
    if origin is None:
        origin = last
    _validate.same_structure(origin, last, name="origin", like_name="trajectory[i]")
    unravel = ravel_pytree(origin)[1]
    flat = jax.vmap(lambda p: ravel_pytree(p)[0])(trajectory)
    offsets = flat - ravel_pytree(origin)[0]
    centred = offsets - offsets.mean(0)
    _, s, vt = jnp.linalg.svd(centred, full_matrices=False)
    var = s**2
    ratio = var[:k] / jnp.maximum(var.sum(), jnp.finfo(var.dtype).tiny)
    vt = vt[:k]
    # Fix the sign so the trajectory runs from negative to positive coordinates.
    coords = offsets @ vt.T
    sign = jnp.where(coords[0] > 0, -1.0, 1.0)
    vt = vt * sign[:, None]
    return PCADirections(jax.vmap(unravel)(vt), ratio, offsets @ vt.T, origin)
