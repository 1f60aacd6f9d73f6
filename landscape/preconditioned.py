"""The curvature an adaptive optimizer feels: P^{-1/2} H P^{-1/2}.

An optimizer with a preconditioner P steps along -η P⁻¹ g, so near a point it is
gradient descent on a loss whose Hessian is P^{-1/2} H P^{-1/2} (change variables
w = P^{-1/2} u). That operator is symmetric and has the spectrum of P⁻¹H, so every
spectrum tool (`eigenvalues`, `trace`, `density`, `per_block`) applies to it unchanged.
Its top eigenvalue is the *preconditioned sharpness* of Cohen et al., "Adaptive
Gradient Methods at the Edge of Stability" (2022), which for Adam with β₁ settles at
(2 + 2β₁) / ((1 − β₁) η) in full-batch training.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from landscape import _validate
from landscape.operators import _OperatorMethods


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("op", "precond"), meta_fields=("apply",))
@dataclasses.dataclass(frozen=True)
class PreconditionedOperator(_OperatorMethods):
    """`P^{-1/2} op P^{-1/2}`; build one with `preconditioned`.

    Exactly one way of applying P^{-1/2} is set: `precond` a pytree like `op.params` of
    P's positive diagonal, or a callable pytree (arrays as leaves, e.g. Kronecker roots)
    applying P^{-1/2}; or `apply`, a plain function applying P^{-1/2} (static: a new
    function compiles anew).
    """

    op: Any
    precond: Any
    apply: Callable[[Any], Any] | None = None

    @property
    def params(self) -> Any:
        return self.op.params

    def inverse_sqrt(self, v: Any) -> Any:
        """P^{-1/2} v."""
        if self.apply is not None:
            return self.apply(v)
        if callable(self.precond):
            return self.precond(v)
        return jax.tree.map(lambda x, d: x * jax.lax.rsqrt(d).astype(x.dtype), v,
                            self.precond)

    def matvec(self, v: Any) -> Any:
        """P^{-1/2} H P^{-1/2} v: one matvec of `op` and two applications of P^{-1/2}."""
        _validate.same_structure(v, self.params)
        return self.inverse_sqrt(self.op.matvec(self.inverse_sqrt(v)))

    def value(self) -> jax.Array:
        return self.op.value()

    @property
    def sharded(self) -> bool:
        return self.op.sharded


def _check_diagonal(precond: Any, params: Any) -> Any:
    _validate.same_structure(precond, params, name="precond")
    precond = jax.tree.map(lambda d, p: jnp.asarray(d, jnp.result_type(p)), precond, params)
    if _validate.is_concrete(precond):
        for d in jax.tree.leaves(precond):
            d = np.asarray(d)
            if not np.all(np.isfinite(d)) or not np.all(d > 0):
                raise ValueError("`precond` must hold the positive, finite diagonal of P; "
                                 f"found entries as low as {d.min()!r}.")
    return precond


def preconditioned(op, precond: Any) -> PreconditionedOperator:
    """The operator P^{-1/2} H P^{-1/2}: the curvature seen by a preconditioned optimizer.

    Its spectrum is that of P⁻¹H (similar matrices), and it is symmetric when H is, so
    `ls.eigenvalues`, `ls.trace`, `ls.density` and `ls.per_block` apply. Its largest
    eigenvalue is the preconditioned sharpness λ₁(P⁻¹H) of Cohen et al. 2022
    ("Adaptive Gradient Methods at the Edge of Stability"): full-batch Adam with
    learning rate η and β₁ hovers at λ₁ ≈ (2 + 2β₁) / ((1 − β₁) η), 38/η at β₁ = 0.9.

    Args:
      op: any operator (`ls.hessian`, `ls.ggn`, `ls.fisher`, `ls.LinearOperator`, ...).
      precond: P, either a pytree like `op.params` holding P's positive diagonal entries
        (Adam's √v̂ + ε, for instance), or a callable `v -> P^{-1/2} v` on such pytrees
        (symmetric positive definite, e.g. Shampoo's Kronecker roots). A callable that
        is a JAX pytree keeps its arrays as data, so jitted spectrum routines compile
        once; a plain function is static and compiles once per function object.
        `transforms.preconditioner(opt_state)` returns either form from an optimizer's
        state.

    Example:
      >>> H = ls.hessian(loss_fn, params, batch)
      >>> P = tx.preconditioner(opt_state)            # Adam: √v̂ + ε
      >>> lam = ls.eigenvalues(ls.preconditioned(H, P), key=key).values[0]
      >>> lam * learning_rate                          # ≈ 38 at Adam's edge of stability
    """
    if not hasattr(op, "matvec") or not hasattr(op, "params"):
        raise ValueError("`op` must be an operator with `matvec` and `params` (e.g. "
                         f"ls.hessian(...)); got {type(op).__name__}.")
    if callable(precond):
        leaves = jax.tree.leaves(precond)
        if leaves and not (len(leaves) == 1 and leaves[0] is precond):
            return PreconditionedOperator(op, precond, None)
        return PreconditionedOperator(op, None, precond)
    return PreconditionedOperator(op, _check_diagonal(precond, op.params), None)
