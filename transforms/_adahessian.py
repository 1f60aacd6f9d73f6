"""AdaHessian (Yao et al. 2021): Adam with a Hutchinson Hessian diagonal as its second moment."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from landscape._validate import fraction, nonnegative, positive_int, unit_interval

__all__ = ["AdaHessianState", "adahessian", "hutchinson_diagonal", "scale_by_adahessian",
           "spatial_average"]


def hutchinson_diagonal(obj_fn: Callable[[Any], jax.Array], params: Any,
                        key: jax.Array) -> Any:
    """One Hutchinson probe of the Hessian diagonal, z ⊙ (∇²obj_fn(params) z).

    z is a Rademacher vector (entries ±1), so the estimate is unbiased with variance
    Σ_{j≠i} H_ij² per entry. The product is forward-over-reverse (`jax.jvp` of
    `jax.grad`), about two gradients.

    Example:
      >>> d = tx.hutchinson_diagonal(lambda p: loss_fn(p, batch), params, key)
    """
    z = otu.random_like(key, params, jax.random.rademacher)
    z = otu.cast_like(z, params)
    hz = jax.jvp(jax.grad(obj_fn), (params,), (z,))[1]
    return jax.tree.map(jnp.multiply, z, hz)


def spatial_average(d: jax.Array) -> jax.Array:
    """AdaHessian's spatial averaging of |D| for one parameter.

    Kernels of rank ≥ 3 are taken in the Flax / JAX layout (spatial..., in, out): |D| is
    averaged over the leading spatial axes, so every filter tap of one (in, out) pair
    shares a value (Yao et al. 2021, Sec. 3.3). Vectors and matrices keep |D|.
    """
    d = jnp.abs(d)
    if d.ndim <= 2:
        return d
    axes = tuple(range(d.ndim - 2))
    return jnp.broadcast_to(jnp.mean(d, axis=axes, keepdims=True), d.shape)


class AdaHessianState(NamedTuple):
    """State of `scale_by_adahessian`."""
    count: jax.Array           # steps taken
    hessian_count: jax.Array   # Hessian estimates folded into nu
    mu: Any                    # EMA of gradients
    nu: Any                    # EMA of squared (spatially averaged) Hessian diagonals


def scale_by_adahessian(
    b1: Any = 0.9,
    b2: Any = 0.999,
    eps: Any = 1e-4,
    hessian_power: Any = 1.0,
    update_interval: int = 1,
    spatial_averaging: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """Rescales updates by AdaHessian's curvature: m̂ / ((√v̂)^k + ε).

    Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning",
    AAAI 2021, Algorithm 1. Every `update_interval` steps (the first step included) a
    Hutchinson probe D = z ⊙ Hz is spatially averaged to D_s and folded into
    v ← b2 v + (1 − b2) D_s ⊙ D_s; each step m ← b1 m + (1 − b1) g, both bias-corrected
    (v by the number of Hessian estimates so far), and k = `hessian_power`.

    Extra arguments of `update` (supplied by `transforms.train_step`):
      obj_fn: `obj_fn(params) -> loss` on the current batch;
      key: a `jax.random` key for the probe, fresh every step.

    Args:
      b1, b2: EMA decay rates of the gradient and of the squared Hessian diagonal.
      eps: added to the denominator.
      hessian_power: k in (0, 1]; 1 is the paper's default, 0.5 damps the curvature.
      update_interval: re-estimate the Hessian diagonal every this many steps (a
        `lax.cond`: the cost is paid only on those steps unless a `vmap` batches the
        step counter).
      spatial_averaging: apply `spatial_average` to each leaf's D (kernels of rank
        ≥ 3 in the Flax layout); False uses |D| as is.

    Example:
      >>> opt = optax.chain(tx.scale_by_adahessian(), optax.scale(-0.15))
    """
    unit_interval(b1, "b1")
    unit_interval(b2, "b2")
    nonnegative(eps, "eps")
    fraction(hessian_power, "hessian_power")
    positive_int(update_interval, "update_interval")
    average = spatial_average if spatial_averaging else jnp.abs

    def init_fn(params):
        return AdaHessianState(count=jnp.zeros([], jnp.int32),
                               hessian_count=jnp.zeros([], jnp.int32),
                               mu=otu.zeros_like(params), nu=otu.zeros_like(params))

    def update_fn(updates, state, params=None, *, obj_fn=None, key=None, **extra_args):
        del extra_args
        if params is None or obj_fn is None or key is None:
            raise ValueError("scale_by_adahessian needs `params` and the extra arguments "
                             "`obj_fn(params) -> loss` and `key` (transforms.train_step "
                             "supplies them).")

        def refresh(nu, hessian_count):
            d = hutchinson_diagonal(obj_fn, params, key)
            d = jax.tree.map(average, d)
            nu = otu.update_moment_per_elem_norm(d, nu, b2, 2)
            return otu.cast_like(nu, state.nu), optax.safe_int32_increment(hessian_count)

        nu, hessian_count = jax.lax.cond(
            state.count % update_interval == 0, refresh, lambda n, c: (n, c),
            state.nu, state.hessian_count)
        count = optax.safe_int32_increment(state.count)
        mu = otu.update_moment(updates, state.mu, b1, 1)
        mu_hat = otu.bias_correction(mu, b1, count)
        nu_hat = otu.bias_correction(nu, b2, hessian_count)
        new = jax.tree.map(
            lambda m, v: m / (jnp.power(jnp.sqrt(v), hessian_power) + eps), mu_hat, nu_hat)
        return new, AdaHessianState(count=count, hessian_count=hessian_count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adahessian(learning_rate: optax.ScalarOrSchedule, b1: Any = 0.9, b2: Any = 0.999,
               eps: Any = 1e-4, weight_decay: Any = 0.0, hessian_power: Any = 1.0,
               update_interval: int = 1, spatial_averaging: bool = True
               ) -> optax.GradientTransformationExtraArgs:
    """AdaHessian: w ← w − η (m̂ / ((√v̂)^k + ε) + λ w), with decoupled weight decay λ.

    Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning",
    AAAI 2021 (defaults η = 0.15, b = (0.9, 0.999), ε = 1e-4, k = 1 in the authors'
    code). See `scale_by_adahessian` for the extra arguments (`obj_fn`, `key`).

    Example:
      >>> opt = tx.adahessian(learning_rate=0.15, update_interval=10)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(g, state, params,
      ...     obj_fn=lambda p: loss_fn(p, batch), key=jax.random.key(step))
    """
    parts = [scale_by_adahessian(b1, b2, eps, hessian_power, update_interval,
                                 spatial_averaging)]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return optax.chain(*parts)
