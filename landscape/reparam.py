"""Reparameterizations that leave a network's function unchanged.

ReLU is positively homogeneous, relu(α z) = α relu(z) for α > 0, so multiplying the
weights and biases feeding a ReLU layer by α and the weights leaving it by 1/α changes
no output. Dinh et al. 2017 ("Sharp Minima Can Generalize For Deep Nets") use it to
make any minimum as sharp as one likes: λ_max moves by about α² while the function,
and so the generalization, stays put. A sharpness measure worth trusting should not
move (`ls.sharpness.adaptive` with η = 0, `ls.sharpness.fisher_rao_norm`).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from landscape.blocks import key_name


def _as_paths(spec: str | Sequence[str], name: str) -> list[tuple[str, ...]]:
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"`{name}` must be a path like 'layer0' or 'layer1/w', or a list "
                         f"of them; got {spec!r}.")
    return [tuple(s.strip("/").split("/")) for s in items]


def rescale_relu(params: Any, alpha: float, *, incoming: str | Sequence[str],
                 outgoing: str | Sequence[str]) -> Any:
    """Multiply the `incoming` leaves by α and the `outgoing` leaves by 1/α.

    The network computes the same function afterwards when `incoming` are all the
    parameters of the layer that feeds a ReLU (its weights *and* bias) and `outgoing`
    are the weights (not the bias) of the layer that reads it.

    Args:
      params: the parameter pytree.
      alpha: the scale, > 0 (ReLU is homogeneous only for positive scales).
      incoming: paths of leaves or subtrees scaled by α, keys joined by '/'
        (`"layer0"` for a whole dict of w and b, `"Dense_0/kernel"`, ...).
      outgoing: paths scaled by 1/α (`"layer1/w"`).

    Returns:
      A new pytree like `params`.

    Example:
      >>> p10 = ls.rescale_relu(params, 10.0, incoming="layers/0", outgoing="layers/1/kernel")
      >>> loss_fn(p10, batch) == loss_fn(params, batch)   # up to rounding
    """
    if not (np.ndim(alpha) == 0 and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"`alpha` must be a positive finite scalar; got {alpha!r}.")
    into = _as_paths(incoming, "incoming")
    out = _as_paths(outgoing, "outgoing")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [tuple(key_name(k) for k in path) for path, _ in leaves]

    def hits(prefixes):
        found = [any(p[:len(q)] == q for p in paths) for q in prefixes]
        return found

    for prefixes, name in ((into, "incoming"), (out, "outgoing")):
        missing = ["/".join(q) for q, ok in zip(prefixes, hits(prefixes)) if not ok]
        if missing:
            raise ValueError(f"`{name}` names {missing}, not in params; its leaves are "
                             f"{['/'.join(p) for p in paths]}.")
    new = []
    for p, (_, leaf) in zip(paths, leaves):
        a = any(p[:len(q)] == q for q in into)
        b = any(p[:len(q)] == q for q in out)
        if a and b:
            raise ValueError(f"Leaf '{'/'.join(p)}' is in both `incoming` and `outgoing`.")
        new.append(leaf * alpha if a else leaf / alpha if b else leaf)
    return jax.tree.unflatten(treedef, new)
