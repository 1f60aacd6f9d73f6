"""Sophia with its two Hessian-diagonal estimators (Liu et al. 2023).

Sophia-H is `optax.contrib.sophia` with optax's Hutchinson estimator, unchanged.
Sophia-G uses the Gauss-Newton-Bartlett estimator below, by default in the step order
of the paper's Algorithm 3 (`scale_by_sophia`, `order="paper"`), or, with
`order="optax"`, plugged into optax's transform through its `hessian_diagonal_fn` hook.

The two orders
--------------
Liu et al.'s Algorithm 3, at step t (1-based), refreshes first and then steps:

    m_t = β1 m_{t-1} + (1 − β1) g_t
    if t mod k = 1:  h_t = β2 h_{t-k} + (1 − β2) ĥ_t      (else h_t = h_{t-1})
    θ_{t+1} = θ_t − η λ θ_t − η clip(m_t / max(γ h_t, ε), 1)

`optax.contrib.sophia` steps with the estimate from *before* this step's refresh
(h_{t-1}) and divides a bias-corrected m_t / (1 − β1ᵗ): its first step, with h_0 = 0,
is −η (sign(g_1) + λ θ_1) whatever the curvature, where Algorithm 3's first step
already divides by the first estimate.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from landscape._validate import choice, positive_int

__all__ = ["SophiaState", "gauss_newton_bartlett", "scale_by_sophia", "sophia_g",
           "sophia_h"]

_LOSSES = ("cross_entropy", "mse")
_ORDERS = ("paper", "optax")


class SophiaState(NamedTuple):
    """State of `scale_by_sophia`: step count, momentum m, Hessian-diagonal EMA h."""

    count: jax.Array
    mu: Any
    nu: Any
    hessian_fn_state: Any


def scale_by_sophia(hessian_diagonal_fn: optax.GradientTransformation, *,
                    b1: Any = 0.965, b2: Any = 0.99, eps: Any = 1e-8, gamma: Any = 0.01,
                    clip_threshold: Optional[Any] = 1.0, update_interval: int = 10
                    ) -> optax.GradientTransformationExtraArgs:
    """Sophia's direction in the order of Liu et al. 2023, Algorithm 3 (no learning rate,
    no weight decay): refresh h from `hessian_diagonal_fn` when the step is a multiple of
    `update_interval` (from the first), then return clip(m / max(γ h, ε), ±clip_threshold)
    with m ← b1 m + (1 − b1) g (no bias correction, as in the paper).

    The refresh branches on the extra argument `step` when given (`train_step(...,
    step=t)`; unbatched inside `jax.vmap`, the branch stays a branch), else on the
    state's count. Other extra arguments go to `hessian_diagonal_fn`'s update. See the
    module docstring for how this differs from `optax.contrib.sophia`.

    Example:
      >>> opt = optax.chain(tx.scale_by_sophia(tx.gauss_newton_bartlett()),
      ...                   optax.add_decayed_weights(1e-4), optax.scale_by_learning_rate(1e-3))
    """
    update_interval = positive_int(update_interval, "update_interval")
    hessian_diagonal_fn = optax.with_extra_args_support(hessian_diagonal_fn)

    def init_fn(params):
        return SophiaState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params),
                           optax.tree.zeros_like(params), hessian_diagonal_fn.init(params))

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        if params is None:
            raise ValueError("scale_by_sophia needs `params` in update.")

        def refresh(hess_state, nu):
            diag, hess_state = hessian_diagonal_fn.update(updates, hess_state, params,
                                                          **extra_args)
            return hess_state, jax.tree.map(lambda n, d: b2 * n + (1 - b2) * d, nu, diag)

        now = state.count if step is None else step
        hess_state, nu = jax.lax.cond(now % update_interval == 0, refresh,
                                      lambda h, n: (h, n), state.hessian_fn_state,
                                      state.nu)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        direction = jax.tree.map(lambda m, h: m / jnp.maximum(gamma * h, eps), mu, nu)
        if clip_threshold is not None:
            direction = jax.tree.map(
                lambda u: jnp.clip(u, -clip_threshold, clip_threshold), direction)
        return direction, SophiaState(optax.safe_increment(state.count), mu, nu,
                                      hess_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gauss_newton_bartlett(loss: str = "cross_entropy") -> optax.GradientTransformationExtraArgs:
    """Gauss-Newton-Bartlett estimate of the Hessian diagonal, for Sophia-G.

    Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
    Pre-training", 2023, Algorithm 2: with outputs z_b = f(w, x_b) of a minibatch of B
    inputs, labels ŷ_b sampled from the model's own predictive distribution, and
    ĝ = ∇_w (1/B) Σ_b ℓ(z_b, ŷ_b), it returns B · ĝ ⊙ ĝ, an unbiased estimate of the
    diagonal of the Gauss-Newton matrix (for each example, E[∇ℓ ∇ℓᵀ] over ŷ equals the
    output-space Hessian, Bartlett's identity).

    `loss="cross_entropy"`: ŷ ~ softmax(z) (classes on the last axis).
    `loss="mse"` (ℓ = ½‖z − y‖², a unit Gaussian likelihood): ŷ = z + N(0, I).

    Extra arguments of `update` (it ignores the incoming gradient):
      output_fn: `output_fn(params) -> outputs` of the current batch's inputs, leading
        axis B (e.g. `lambda p: apply_fn(p, inputs)`; `transforms.train_step` builds it
        from `apply_fn`). One forward and one backward pass through it per call.
      key: a `jax.random` key for the sampled labels; pass a fresh one every call.

    Example:
      >>> opt = optax.contrib.sophia(3e-3, hessian_diagonal_fn=tx.gauss_newton_bartlett())
      >>> state = opt.init(params)
      >>> updates, state = opt.update(g, state, params,
      ...     output_fn=lambda p: apply_fn(p, x), key=jax.random.key(step))
    """
    choice(loss, "loss", _LOSSES)

    def update_fn(updates, state, params=None, *, output_fn=None, key=None, **extra_args):
        del updates, extra_args
        if params is None or output_fn is None or key is None:
            raise ValueError("gauss_newton_bartlett needs `params` and the extra arguments "
                             "`output_fn(params) -> outputs` and `key` (pass `apply_fn=` "
                             "to transforms.train_step).")
        outputs, pullback = jax.vjp(output_fn, params)
        b = outputs.shape[0]
        # The output cotangent of (1/B) Σ ℓ(z_b, ŷ_b) in closed form, so one backward
        # pass gives ĝ.
        if loss == "cross_entropy":
            sampled = jax.random.categorical(key, outputs, axis=-1)
            probs = jax.nn.softmax(outputs, axis=-1)
            onehot = jax.nn.one_hot(sampled, outputs.shape[-1], dtype=outputs.dtype)
            cotangent = (probs - onehot) / b
        else:
            noise = jax.random.normal(key, outputs.shape, outputs.dtype)
            cotangent = -noise / b
        (g_hat,) = pullback(jax.lax.stop_gradient(cotangent))
        return jax.tree.map(lambda g: b * g * g, g_hat), state

    return optax.GradientTransformationExtraArgs(lambda _: optax.EmptyState(), update_fn)


def sophia_h(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.965, b2: Any = 0.99,
             eps: Any = 1e-8, weight_decay: Any = 1e-4, gamma: Any = 0.01,
             clip_threshold: Optional[Any] = 1.0, update_interval: int = 10,
             seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Sophia-H: `optax.contrib.sophia` with its Hutchinson Hessian-diagonal estimator.

    Each step: m ← b1 m + (1 − b1) g; every `update_interval` steps
    h ← b2 h + (1 − b2) u ⊙ (H u) with a Rademacher probe u; the step is
    −η clip(m̂ / max(γ h, ε), ±clip_threshold) − η λ w (Liu et al., "Sophia: A Scalable
    Stochastic Second-order Optimizer for Language Model Pre-training", 2023). This is
    optax's implementation unchanged; the probe key lives in the optimizer state, seeded
    by `seed`.

    Extra argument of `update`: `obj_fn(params) -> loss` on the current batch (the
    Hessian-vector product is `jax.jvp` of `jax.grad(obj_fn)`, ≈ 2 gradients, paid once
    every `update_interval` steps).

    Example:
      >>> opt = tx.sophia_h(learning_rate=1e-3)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(g, state, params,
      ...                             obj_fn=lambda p: loss_fn(p, batch))
    """
    positive_int(update_interval, "update_interval")
    return contrib.sophia(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, gamma=gamma,
        clip_threshold=clip_threshold, update_interval=update_interval,
        hessian_diagonal_fn=contrib.hutchinson_estimator_diag_hessian(
            jax.random.PRNGKey(seed)))


def sophia_g(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.965, b2: Any = 0.99,
             eps: Any = 1e-8, weight_decay: Any = 1e-4, gamma: Any = 0.01,
             clip_threshold: Optional[Any] = 1.0, update_interval: int = 10,
             loss: str = "cross_entropy", order: str = "paper"
             ) -> optax.GradientTransformationExtraArgs:
    """Sophia-G: Sophia with the Gauss-Newton-Bartlett estimator (Liu et al. 2023).

    `order="paper"` (default): Algorithm 3 as written, refresh the estimate then step
    (`scale_by_sophia`, then decoupled weight decay, then −η). `order="optax"`:
    `optax.contrib.sophia` with this estimator (each step uses the estimate from
    before its refresh, and a bias-corrected momentum); the module docstring states the
    difference. The Hessian diagonal comes from `gauss_newton_bartlett` (Algorithm 2),
    which needs the extra arguments `output_fn` and `key`
    (`transforms.train_step(..., apply_fn=apply_fn)` supplies both). The paper's
    Sophia-G scales the estimate by the batch size, which `gauss_newton_bartlett`
    does; tune `gamma` accordingly.

    Example:
      >>> opt = tx.sophia_g(learning_rate=1e-3)
      >>> state = opt.init(params)
      >>> step = tx.train_step(opt, loss_fn, params, state, (x, y), key, apply_fn=apply_fn)
    """
    positive_int(update_interval, "update_interval")
    choice(order, "order", _ORDERS)
    if order == "optax":
        return contrib.sophia(
            learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, gamma=gamma,
            clip_threshold=clip_threshold, update_interval=update_interval,
            hessian_diagonal_fn=gauss_newton_bartlett(loss))
    return optax.chain(
        scale_by_sophia(gauss_newton_bartlett(loss), b1=b1, b2=b2, eps=eps, gamma=gamma,
                        clip_threshold=clip_threshold, update_interval=update_interval),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate))
