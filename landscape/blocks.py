"""Restricting an operator to a block of parameters: H_bb without forming the rest.

The block is chosen by a predicate on each parameter's path (`"layers/0/kernel"`), so
"all kernels", "the first layer" or "every attention weight" are one-line selectors.
The restricted operator acts on a flat dict `{path: leaf}` of the selected leaves; every
function that takes an operator (`eigenvalues`, `trace`, `density`, `diagonal`) takes it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from landscape.operators import LinearOperator


def key_name(key) -> str:
    """The name of one entry of a pytree key path: a dict key, index or attribute."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    """`"layers/0/kernel"` for a pytree key path."""
    return "/".join(key_name(k) for k in path)


def restrict(op, select: Callable[[str, Any], bool]) -> LinearOperator:
    """The diagonal block of `op` for the parameters `select(path, leaf)` keeps.

    `matvec(v_b)` embeds `v_b` with zeros elsewhere, applies `op` and keeps the block:
    exactly `H_bb v_b`, at the cost of one full matvec.

    Example:
      >>> first = ls.restrict(H, lambda path, leaf: path.startswith("layers/0/"))
      >>> ls.eigenvalues(first, k=1, key=key).values      # λ_max of that layer's block
      >>> ls.trace(first, key=key).value
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(op.params)
    names = [path_name(p) for p, _ in leaves]
    chosen = [i for i, (n, (_, leaf)) in enumerate(zip(names, leaves)) if select(n, leaf)]
    if not chosen:
        raise ValueError("`select` kept no parameter; paths look like "
                         f"{names[:3]}.")
    block = {names[i]: leaves[i][1] for i in chosen}
    template = [jnp.zeros_like(leaf) for _, leaf in leaves]

    def matvec(v_block):
        full = list(template)
        for i in chosen:
            full[i] = v_block[names[i]].astype(template[i].dtype)
        out = jax.tree.leaves(op.matvec(jax.tree.unflatten(treedef, full)))
        return {names[i]: out[i] for i in chosen}

    return LinearOperator(matvec, block)
