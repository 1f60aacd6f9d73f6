"""The preconditioner P an optimizer's state implies, for `landscape.preconditioned`.

An optimizer that steps along −η P⁻¹ m feels the curvature P^{-1/2} H P^{-1/2}
(`ls.preconditioned`). `preconditioner(state)` finds the state that defines P inside
any chain (`optax.chain`, `inject_hyperparams`, masks) and returns P as `ls.preconditioned`
takes it: the positive diagonal of P as a pytree like params for the diagonal
optimizers, or a callable pytree applying P^{-1/2} for Shampoo and SOAP.

Hyper-parameters that the state does not hold (Adam's b2 and eps, say) are taken, in
order, from the keyword arguments, from `optax.inject_hyperparams`' record when the
optimizer was built with it, and from the optimizer's own defaults (listed in
`preconditioner`'s docstring), so pass the values you built the optimizer with.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax import contrib
from optax._src import transform as _transform  # ScaleByRmsWithCountState is not exported

import landscape as ls
from transforms import _second_order_blocks as blocks
from transforms._adahessian import AdaHessianState
from transforms.shampoo import ShampooState
from transforms.soap import SoapState

__all__ = ["KroneckerPreconditioner", "preconditioned_lambda_max", "preconditioner"]


def _bias_corrected(nu: Any, decay: Any, count: jax.Array) -> Any:
    if not isinstance(count, jax.core.Tracer) and int(count) == 0:
        raise ValueError("`state` has taken no step yet (count 0): its second moment "
                         "is empty and bias correction divides by zero.")
    if not isinstance(decay, jax.core.Tracer) and decay == 1:  # plain sums (AdaGrad)
        return nu
    return optax.tree.bias_correction(nu, decay, count)


def _adam(state, b2, eps, eps_root):
    nu_hat = _bias_corrected(state.nu, b2, state.count)
    return jax.tree.map(lambda v: jnp.sqrt(v + eps_root) + eps, nu_hat)


def _rms(state, decay, eps, eps_in_sqrt):
    nu = state.nu
    if isinstance(state, _transform.ScaleByRmsWithCountState):  # bias_correction=True
        nu = _bias_corrected(nu, decay, state.count)
    if eps_in_sqrt:
        return jax.tree.map(lambda v: jnp.sqrt(v + eps), nu)
    return jax.tree.map(lambda v: jnp.sqrt(v) + eps, nu)


def _sophia(state, gamma, eps):
    # The step divides m̂ by max(γ h, ε) before clipping (Liu et al. 2023); P is that
    # linear part. Where h <= ε/γ the clip, not P, bounds the real step.
    return jax.tree.map(lambda h: jnp.maximum(gamma * h, eps), state.nu)


def _adahessian(state, b2, eps, hessian_power):
    nu_hat = _bias_corrected(state.nu, b2, state.hessian_count)
    return jax.tree.map(lambda v: jnp.power(jnp.sqrt(v), hessian_power) + eps, nu_hat)


class _Reader(NamedTuple):
    read: Callable
    defaults: dict


_READERS: dict[type, _Reader] = {
    optax.ScaleByAdamState: _Reader(_adam, dict(b2=0.999, eps=1e-8, eps_root=0.0)),
    optax.ScaleByRmsState: _Reader(_rms, dict(decay=0.9, eps=1e-8, eps_in_sqrt=True)),
    _transform.ScaleByRmsWithCountState: _Reader(_rms, dict(decay=0.9, eps=1e-8,
                                                       eps_in_sqrt=True)),
    contrib.SophiaState: _Reader(_sophia, dict(gamma=0.01, eps=1e-8)),
    AdaHessianState: _Reader(_adahessian, dict(b2=0.999, eps=1e-4, hessian_power=1.0)),
}


# ---------------------------------------------------------- Shampoo and SOAP ---

@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("mats", "scales"), meta_fields=("plans", "treedef"))
@dataclasses.dataclass(frozen=True)
class KroneckerPreconditioner:
    """`v -> P^{-1/2} v` for a Kronecker-factored P, leaf by leaf (in `jax.tree.leaves`
    order of params).

    For each leaf, with `mats` its per-dimension `(num_blocks, b, b)` matrices and
    `scales` an array or None:
      - no `mats`: `v * scales` (a diagonal P^{-1/2}), or `v` when `scales` is None;
      - `mats`, `scales` None (Shampoo): `v ×₁ M₁ ⋯ ×ₖ Mₖ` on each block;
      - `mats` and `scales` (SOAP, `mats` the eigenbases Q): `Q (scales ⊙ Qᵀ v)`.
    """

    mats: tuple
    scales: tuple
    plans: tuple
    treedef: Any

    def __call__(self, v: Any) -> Any:
        leaves = self.treedef.flatten_up_to(v)
        out = [self._leaf(x, m, s, pl)
               for x, m, s, pl in zip(leaves, self.mats, self.scales, self.plans)]
        return self.treedef.unflatten(out)

    @staticmethod
    def _leaf(x, mats, scale, plan):
        if not mats:
            return x if scale is None else x * scale
        xb = blocks.to_blocks(x, plan)
        if scale is None:
            for i, m in enumerate(mats):
                xb = blocks.mode_product(xb, m, i)
        else:
            for i, q in enumerate(mats):
                xb = blocks.mode_product(xb, jnp.swapaxes(q, -1, -2), i)
            xb = xb * scale
            for i, q in enumerate(mats):
                xb = blocks.mode_product(xb, q, i)
        return blocks.from_blocks(xb, plan)


def _plans(leaves, factors, block_size):
    plans = tuple(blocks.make_plan(np.shape(x), block_size) for x in leaves)
    for pl, f in zip(plans, factors):
        if tuple(m.shape[-1] for m in f) != (pl.block if pl.preconditioned else ()):
            raise ValueError("`block_size` does not match the state's blocks; pass the "
                             "block_size the optimizer was built with.")
    return plans


def _psd_sqrt(m: jax.Array) -> jax.Array:
    w, v = jnp.linalg.eigh(0.5 * (m + jnp.swapaxes(m, -1, -2)))
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))[..., None, :]) @ jnp.swapaxes(v, -1, -2)


def _shampoo(state, b2, graft_eps, block_size):
    # P⁻¹ = ⊗ roots (each root (Ŝᵢ + εI)^(-1/p)), so P^{-1/2} = ⊗ rootsᵢ^{1/2}. The
    # graft's per-parameter norm rescaling is not a fixed linear map and is left out.
    leaves, treedef = jax.tree.flatten(state.mu)
    plans = _plans(leaves, state.roots, block_size)
    graft = (jax.tree.leaves(_adam(state, b2, graft_eps, 0.0)) if state.nu != ()
             else [None] * len(leaves))
    mats = tuple(tuple(_psd_sqrt(r) for r in roots) for roots in state.roots)
    scales = tuple(None if pl.preconditioned or g is None else jax.lax.rsqrt(g)
                   for pl, g in zip(plans, graft))
    return KroneckerPreconditioner(mats, scales, plans, treedef)


def _soap(state, b2, eps, block_size):
    # Adam in the eigenbasis Q: P = Q diag(√v̂ + ε) Qᵀ blockwise.
    leaves, treedef = state.layout.leaves, state.layout.treedef
    plans = _plans(leaves, state.bases, block_size)
    if not isinstance(state.count, jax.core.Tracer) and int(state.count) == 0:
        raise ValueError("`state` has taken no step yet (count 0).")
    c2 = 1 - b2 ** state.count
    scales = tuple(jax.lax.rsqrt(jnp.sqrt(v / c2) + eps) for v in state.nu)
    return KroneckerPreconditioner(tuple(state.bases), scales, plans, treedef)


_READERS[ShampooState] = _Reader(_shampoo, dict(b2=0.999, graft_eps=1e-8, block_size=1024))
_READERS[SoapState] = _Reader(_soap, dict(b2=0.95, eps=1e-8, block_size=1024))


# ------------------------------------------------------------------- finding ---

def _find(state: Any, hyper: dict, found: list) -> None:
    """Append `(node, injected hyper-parameters)` for every known state in `state`."""
    if type(state) in _READERS:
        found.append((state, hyper))
        return
    if isinstance(getattr(state, "hyperparams", None), dict):  # inject_hyperparams
        hyper = {**hyper, **state.hyperparams}
    if isinstance(state, dict):
        children = state.values()
    elif isinstance(state, (tuple, list)):
        children = state
    else:
        return
    for child in children:
        _find(child, hyper, found)


def _names(state: Any) -> str:
    if isinstance(state, (tuple, list)) and not hasattr(state, "_fields"):
        return "(" + ", ".join(_names(s) for s in state) + ")"
    return type(state).__name__


def preconditioner(state: Any, *, built_with: dict | None = None,
                   **hyperparameters: Any) -> Any:
    """The preconditioner P of an optimizer state, in the form `ls.preconditioned` takes.

    What P is, for each state found anywhere in a chain (hyper-parameter defaults in
    brackets, those of the optimizers' own defaults):

    - `optax.ScaleByAdamState` (adam, adamw, nadam, ...): √(v̂ + eps_root) + eps with
      v̂ = ν / (1 − b2ᵗ) [b2 0.999, eps 1e-8, eps_root 0].
    - `optax.ScaleByRmsState` (rmsprop): √(ν + eps), or √ν + eps when not
      `eps_in_sqrt`; its counted variant (`bias_correction=True`) corrects ν with
      `decay` first [decay 0.9, eps 1e-8, eps_in_sqrt True].
    - `optax.contrib.SophiaState` (`tx.sophia_g`, `tx.sophia_h`): max(γ h, eps), the clip
      ignored, so coordinates with h <= eps/γ (where the clip bounds the real step)
      get P = eps and dominate P⁻¹H [gamma 0.01, eps 1e-8].
    - `tx.AdaHessianState`: (√v̂)^k + eps, v̂ corrected by the number of Hessian
      estimates [b2 0.999, eps 1e-4, hessian_power 1].
    - `tx.ShampooState`: P⁻¹ = ⊗ᵢ rootsᵢ on each block, the graft's per-parameter norm
      rescaling left out (it is not a fixed linear map); vectors and scalars: the Adam
      graft's √v̂ + graft_eps, or the identity without one [b2 0.999, graft_eps 1e-8,
      block_size 1024].
    - `tx.SoapState`: Q diag(√v̂ + eps) Qᵀ on each block (Q the eigenbases); vectors:
      Adam's √v̂ + eps [b2 0.95, eps 1e-8, block_size 1024].

    The diagonal optimizers give P's diagonal as a pytree like params; Shampoo and SOAP
    give a `KroneckerPreconditioner`, a callable pytree applying P^{-1/2}. For Adam,
    RMSProp, AdaHessian, Shampoo and SOAP it is the P the latest step divided by; for
    Sophia, the one the next step will divide by (it divides before refreshing h).
    Momentum is not part of P: for Adam with β₁, Cohen et al. 2022 put the edge of
    stability of λ₁(P⁻¹H) at (2 + 2β₁)/((1 − β₁)η).

    Args:
      state: an optimizer state (`opt.init(params)` and its updates), holding exactly
        one of the states above.
      built_with: optionally every keyword argument the optimizer was built with (a
        config's optimizer table, say): the ones P depends on are used, the others
        ignored; `hyperparameters` given explicitly take precedence.
      **hyperparameters: the values the optimizer was built with, where they differ
        from the defaults; values recorded by `optax.inject_hyperparams` are used when
        not given here.

    Raises:
      ValueError: if `state` holds none (or several) of the states above, naming the
        types it holds; for an unknown hyper-parameter; for a state that took no step.

    Example:
      >>> opt = optax.adam(1e-3)
      >>> ...  # some steps
      >>> P = tx.preconditioner(opt_state)                      # √v̂ + ε, like params
      >>> A = ls.preconditioned(ls.hessian(loss_fn, params, batch), P)
      >>> ls.eigenvalues(A, key=key).values[0]                  # λ₁(P⁻¹H)
    """
    found: list = []
    _find(state, {}, found)
    if not found:
        raise ValueError(f"`state` ({_names(state)}) holds no optimizer state with a "
                         "preconditioner; supported: "
                         f"{', '.join(sorted(t.__name__ for t in _READERS))}.")
    if len(found) > 1:
        raise ValueError("`state` holds several preconditioned states ("
                         f"{', '.join(type(s).__name__ for s, _ in found)}); pass the "
                         "part of the state that belongs to one of them.")
    node, injected = found[0]
    reader = _READERS[type(node)]
    unknown = sorted(set(hyperparameters) - set(reader.defaults))
    if unknown:
        raise ValueError(f"{type(node).__name__} takes the hyper-parameters "
                         f"{sorted(reader.defaults)}; got unknown {unknown}.")
    given = {k: v for k, v in (built_with or {}).items() if k in reader.defaults}
    given.update(hyperparameters)
    values = {k: given.get(k, injected.get(k, d)) for k, d in reader.defaults.items()}
    return reader.read(node, **values)


def preconditioned_lambda_max(loss_fn: Callable[[Any, Any], jax.Array], params: Any,
                              batch: Any, opt_state: Any, *, key: jax.Array,
                              num_steps: int = 20, chunk_size: int | None = None,
                              **hyperparameters: Any) -> jax.Array:
    """λ₁(P⁻¹H): the largest eigenvalue of the Hessian preconditioned by the optimizer.

    The sharpness an adaptive optimizer feels (Cohen et al. 2022, "Adaptive Gradient
    Methods at the Edge of Stability"): P from `preconditioner(opt_state,
    **hyperparameters)`, H the Hessian of `loss_fn` at `params` on `batch`, and the top
    Ritz value of `num_steps` Lanczos steps on `ls.preconditioned(H, P)`. Jit- and
    vmap-safe, for recording along training; compare it with (2 + 2β₁)/((1 − β₁)η)
    for Adam.

    Example:
      >>> lam = tx.preconditioned_lambda_max(loss_fn, params, batch, opt_state,
      ...                                    key=jax.random.key(0), b2=0.999)
      >>> lam * learning_rate    # ≈ 38 for Adam with β₁ = 0.9 at the edge of stability
    """
    P = preconditioner(opt_state, **hyperparameters)
    H = ls.hessian(loss_fn, params, batch, chunk_size=chunk_size)
    return ls.eigenvalues(ls.preconditioned(H, P), k=1, key=key,
                          num_steps=num_steps).values[0]
