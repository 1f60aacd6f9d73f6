"""Per-layer gradient norms: where gradients vanish or explode through depth."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from landscape.blocks import path_name


class LayerGradNorms(NamedTuple):
    """`norms[name]` is ‖∂L/∂θ_layer‖ over the layer's leaves, layers in parameter
    order; `ratio` is the first layer's norm over the last one's (≪ 1: vanishing
    towards the input, ≫ 1: exploding)."""

    norms: dict
    ratio: jax.Array


def default_layer(path: str) -> str:
    """A leaf's layer: its path without the last part (`layers/3/kernel` → `layers/3`)."""
    return path.rsplit("/", 1)[0] if "/" in path else path


def layer_norms(tree, layer_of: Callable[[str], str] = default_layer) -> dict:
    """The Euclidean norm of each layer's leaves of any pytree, as `{layer: norm}` in
    the order layers first appear when the tree is flattened."""
    sq: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = layer_of(path_name(path))
        sq[name] = sq.get(name, 0.0) + jnp.sum(jnp.square(leaf))
    return {name: jnp.sqrt(s) for name, s in sq.items()}


def layer_grad_norms(loss_fn, params, batch, *,
                     layer_of: Callable[[str], str] = default_layer) -> LayerGradNorms:
    """Per-layer norms of the gradient of `loss_fn(params, batch)`.

    Layers are the groups `layer_of(path)` makes of the parameter paths (by default a
    path without its last part, so a layer's kernel and bias go together); pass your own
    to group differently (e.g. one group per residual block).

    Example:
      >>> g = ls.layer_grad_norms(loss_fn, params, batch)
      >>> g.norms["layers/0"], g.ratio       # first layer, and first / last
    """
    norms = layer_norms(jax.grad(loss_fn)(params, batch), layer_of)
    if not norms:
        raise ValueError("`params` has no leaves.")
    values = list(norms.values())
    return LayerGradNorms(norms, values[0] / values[-1])
