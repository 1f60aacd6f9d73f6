"""Restricting an operator to a block of parameters: H_bb without forming the rest.

The block is chosen by a predicate on each parameter's path (`"layers/0/kernel"`), so
"all kernels", "the first layer" or "every attention weight" are one-line selectors.
The restricted operator acts on a flat dict `{path: leaf}` of the selected leaves; every
function that takes an operator (`eigenvalues`, `trace`, `density`, `diagonal`) takes it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from landscape import _validate
from landscape.operators import _OperatorMethods


def key_name(key) -> str:
    """The name of one entry of a pytree key path: a dict key, index or attribute."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_name(path) -> str:
    """`"layers/0/kernel"` for a pytree key path."""
    return "/".join(key_name(k) for k in path)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("op",), meta_fields=("chosen", "names"))
@dataclasses.dataclass(frozen=True)
class BlockOperator(_OperatorMethods):
    """`op`'s diagonal block for the leaves at positions `chosen` (of `names`, every
    leaf's path). A pytree whose only data is `op`, so one compiled spectrum routine
    serves the block at any parameters and data; build one with `restrict`."""

    op: Any
    chosen: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def params(self) -> dict:
        leaves = jax.tree.leaves(self.op.params)
        return {self.names[i]: leaves[i] for i in self.chosen}

    def matvec(self, v_block: Any) -> Any:
        _validate.same_structure(v_block, self.params, name="v")
        leaves, treedef = jax.tree.flatten(self.op.params)
        full = [jnp.zeros_like(leaf) for leaf in leaves]
        for i in self.chosen:
            full[i] = jnp.asarray(v_block[self.names[i]], leaves[i].dtype)
        out = jax.tree.leaves(self.op.matvec(jax.tree.unflatten(treedef, full)))
        return {self.names[i]: out[i] for i in self.chosen}

    def value(self) -> jax.Array:
        return self.op.value()

    @property
    def sharded(self) -> bool:
        return self.op.sharded

    def gradient(self) -> Any:
        """The block's part of the loss gradient (None when `op` has no loss)."""
        full = self.op.gradient()
        if full is None:
            return None
        out = jax.tree.leaves(full)
        return {self.names[i]: out[i] for i in self.chosen}


def restrict(op, select: Callable[[str, Any], bool]) -> BlockOperator:
    """The diagonal block of `op` for the parameters `select(path, leaf)` keeps.

    `matvec(v_b)` embeds `v_b` with zeros elsewhere, applies `op` and keeps the block:
    exactly `H_bb v_b`, at the cost of at most one full matvec (the zero tangents are
    constants in the compiled program, so XLA drops the work they would feed). The block
    acts on a flat dict `{path: leaf}` of the selected leaves.

    Example:
      >>> first = ls.restrict(H, lambda path, leaf: path.startswith("layers/0/"))
      >>> ls.eigenvalues(first, k=1, key=key).values      # λ_max of that layer's block
      >>> ls.trace(first, key=key).value
    """
    leaves = jax.tree_util.tree_flatten_with_path(op.params)[0]
    names = tuple(path_name(p) for p, _ in leaves)
    chosen = tuple(i for i, (n, (_, leaf)) in enumerate(zip(names, leaves))
                   if select(n, leaf))
    if not chosen:
        raise ValueError("`select` kept no parameter; paths look like "
                         f"{list(names[:3])}.")
    return BlockOperator(op, chosen, names)
