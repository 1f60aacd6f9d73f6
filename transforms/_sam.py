"""The sharpness-aware family: SAM, ASAM and GSAM, each a whole step per `update` call.

`sharpness_aware` is a gradient-to-gradient transformation: it receives the gradient g
at the current point w, perturbs w uphill to w + ε, asks the caller for the gradient
g_p there, and returns g_p (or GSAM's corrected g_p − α g_⊥). Chained in front of any
optax optimizer, the optimizer then steps from the original w, so one `update` call is
one sharpness-aware step and step counts, schedules and logging stay as for SGD.

Why not `optax.contrib.sam` (opaque mode)? It computes the same SAM step, and the tests
check step for step that this module agrees with it, but its outer optimizer sees only
the perturbed gradient: GSAM needs the original gradient too, and m-sharpness needs a
separate perturbation per chunk of the batch. One transform covers all three.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax import tree as otu

from landscape._validate import nonnegative, optional, positive, positive_int, schedule_or

__all__ = [
    "SharpnessAwareState", "asam", "asam_ascent", "gsam", "sam", "sam_ascent",
    "sharpness_aware",
]

_NORM_EPS = 1e-12  # guards ‖g‖ = 0 (at a stationary point the perturbation is then 0)


def sam_ascent(eps: float = _NORM_EPS) -> optax.GradientTransformation:
    """The unit ascent direction of SAM, `g / ‖g‖` (global ℓ2 norm over the tree).

    Foret et al., "Sharpness-Aware Minimization for Efficiently Improving
    Generalization", ICLR 2021, eq. (2) with p = 2. `sharpness_aware` scales it by ρ.

    Example:
      >>> opt = optax.chain(tx.sharpness_aware(0.05, ascent=tx.sam_ascent()), optax.sgd(0.1))
    """
    def update_fn(updates, state, params=None):
        del params
        norm = otu.norm(updates)
        return otu.scale(1.0 / (norm + eps), updates), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def asam_ascent(eta: Any = 0.01, mask: Any = None,
                eps: float = _NORM_EPS) -> optax.GradientTransformation:
    """ASAM's adaptive ascent direction `T_w² g / ‖T_w g‖`, with `T_w = |w| + η`.

    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML 2021 (element-wise operator, p = 2). Scaled
    by ρ this maximizes the loss over the ellipsoid ‖T_w⁻¹ ε‖ ≤ ρ, so the perturbation is
    invariant to rescaling a layer's weights. For large η, T_w ≈ η and the direction
    becomes η · g/‖g‖: SAM with radius ρη.

    Args:
      eta: the offset η > 0 (paper default 0.01); may be an array (vmappable).
      mask: optional pytree of booleans (or a callable of params returning one): leaves
        marked False use T = 1, as some implementations do for biases. Default: all.
      eps: guards a zero gradient.

    Example:
      >>> opt = optax.chain(tx.sharpness_aware(0.5, ascent=tx.asam_ascent(0.01)),
      ...                   optax.sgd(0.1, momentum=0.9))
    """
    positive(eta, "eta")

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("asam_ascent needs `params` (T_w = |w| + eta).")
        t = jax.tree.map(lambda w: jnp.abs(w) + eta, params)
        if mask is not None:
            m = mask(params) if callable(mask) else mask
            t = jax.tree.map(lambda ti, keep: ti if keep else jnp.ones_like(ti), t, m)
        tg = jax.tree.map(jnp.multiply, t, updates)
        norm = otu.norm(tg)
        return jax.tree.map(lambda ti, x: ti * x / (norm + eps), t, tg), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


class SharpnessAwareState(NamedTuple):
    """State of `sharpness_aware`: the step count (for a ρ schedule)."""
    count: jax.Array


def _as_schedule(value):
    return value if callable(value) else (lambda _: value)


def sharpness_aware(
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    ascent: Optional[optax.GradientTransformation] = None,
    alpha: optax.ScalarOrSchedule = 0.0,
    num_chunks: Optional[int] = None,
    batch_axis_name: Optional[str] = None,
) -> optax.GradientTransformationExtraArgs:
    """Replaces the gradient by the gradient at the sharpness-aware perturbed point.

    With g = ∇L(w) (the incoming updates) and d = `ascent`(g, w) a unit ascent direction,
    it computes ε = ρ d and g_p = ∇L(w + ε). With `alpha` = α ≠ 0 it returns GSAM's
    surrogate-gap-guided gradient g_p − α g_⊥, where g_⊥ = g − (⟨g, g_p⟩/‖g_p‖²) g_p is the
    part of g orthogonal to g_p (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware
    Minimization", ICLR 2022, Algorithm 1); with α = 0 it returns g_p (SAM, Foret et al.
    2021, Algorithm 1). Chain an optimizer after it to take the step from w.

    m-sharpness (Foret et al. 2021, Sec. 4.1) perturbs each group of m examples by its
    own ε: with `num_chunks` = k the batch is cut into k equal chunks, each chunk's g_p
    is computed at its own ε, and their mean is returned (needs the `loss_fn` and
    `batch` extra arguments; the incoming g is then not used except by GSAM). With
    `batch_axis_name` each member of a `pmap` / `shard_map` / named `vmap` axis perturbs
    with its local gradient and g_p (and g, for GSAM) is averaged over the axis.

    Extra arguments of `update` (supplied by `transforms.train_step`):
      grad_fn: `grad_fn(params, i) -> grads` on the current batch (the convention of
        `optax.contrib.sam`'s opaque mode; `i` is always 0 here).
      loss_fn, batch: `loss_fn(params, batch) -> mean loss`, only with `num_chunks`.

    Cost: one extra gradient per step (two with the caller's own), or with chunks two
    gradients on the chunks.

    Args:
      rho: radius ρ ≥ 0, a scalar (may be a traced array) or a schedule of the step.
      ascent: unit ascent direction, `sam_ascent()` (default) or `asam_ascent(eta)`; a
        stateless GradientTransformation of (g, params). Its state is not carried
        between steps (like `optax.contrib.sam` with `reset_state=True`).
      alpha: GSAM's α (0 gives SAM), scalar or schedule.
      num_chunks: m-sharpness over this many equal chunks of the batch.
      batch_axis_name: m-sharpness over a named mapped axis.

    Example:
      >>> opt = optax.chain(tx.sharpness_aware(0.05), optax.adam(1e-3))
      >>> grad_fn = lambda p, _: jax.grad(loss_fn)(p, batch)
      >>> g = jax.grad(loss_fn)(params, batch)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(g, state, params, grad_fn=grad_fn)
    """
    ascent = sam_ascent() if ascent is None else ascent
    rho_fn, alpha_fn = _as_schedule(rho), _as_schedule(alpha)
    schedule_or(nonnegative)(rho, "rho")
    schedule_or(nonnegative)(alpha, "alpha")
    optional(positive_int)(num_chunks, "num_chunks")

    def perturbed_grad(grad_of, g, params, r):
        direction, _ = ascent.update(g, ascent.init(params), params)
        return grad_of(otu.add_scale(params, r, direction))

    def init_fn(params):
        del params
        return SharpnessAwareState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, grad_fn=None, loss_fn=None,
                  batch=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("sharpness_aware needs `params` in update.")
        r = rho_fn(state.count)
        if num_chunks is None:
            if grad_fn is None:
                raise ValueError("sharpness_aware needs the extra argument "
                                 "`grad_fn(params, i) -> grads` (transforms.train_step "
                                 "supplies it).")
            g_p = perturbed_grad(lambda p: grad_fn(p, 0), updates, params, r)
        else:
            if loss_fn is None or batch is None:
                raise ValueError("sharpness_aware with `num_chunks` needs the extra "
                                 "arguments `loss_fn` and `batch`.")
            chunks = _split(batch, num_chunks)
            grad_loss = jax.grad(loss_fn)

            def one_chunk(chunk):
                g_c = grad_loss(params, chunk)
                return perturbed_grad(lambda p: grad_loss(p, chunk), g_c, params, r)

            g_p = otu.scale(1.0 / num_chunks,
                            jax.tree.map(lambda x: x.sum(0), jax.lax.map(one_chunk, chunks)))
        if batch_axis_name is not None:
            g_p = jax.lax.pmean(g_p, batch_axis_name)
        a = alpha_fn(state.count)
        if not (isinstance(alpha, (int, float)) and alpha == 0):
            g = updates
            if batch_axis_name is not None:
                g = jax.lax.pmean(g, batch_axis_name)
            coef = otu.vdot(g, g_p) / (otu.vdot(g_p, g_p) + _NORM_EPS)
            g_perp = otu.add_scale(g, -coef, g_p)
            g_p = otu.add_scale(g_p, -a, g_perp)
        g_p = otu.cast_like(g_p, updates)
        return g_p, SharpnessAwareState(count=optax.safe_int32_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _split(batch, num_chunks):
    def reshape(x):
        if x.shape[0] % num_chunks:
            raise ValueError(f"`num_chunks`={num_chunks} must divide the batch size "
                             f"{x.shape[0]}.")
        return x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:])
    return jax.tree.map(reshape, batch)


def _outer(learning_rate, momentum, nesterov, weight_decay):
    # A literal 0 momentum skips the (numerically neutral) trace, keeping the state small.
    mom = None if isinstance(momentum, (int, float)) and momentum == 0 else momentum
    parts = []
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.sgd(learning_rate, momentum=mom, nesterov=nesterov))
    return parts


def sam(learning_rate: optax.ScalarOrSchedule, rho: optax.ScalarOrSchedule = 0.05,
        momentum: Any = 0.0, nesterov: bool = False, weight_decay: Any = 0.0,
        num_chunks: Optional[int] = None,
        batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
    """SAM with an SGD (optionally momentum, weight decay) outer step.

    w ← w − η (∇L(w + ρ g/‖g‖) + λ w), Foret et al., "Sharpness-Aware Minimization for
    Efficiently Improving Generalization", ICLR 2021. Weight decay is added to the
    gradient (coupled), as in the paper's experiments. For another outer optimizer use
    `optax.chain(sharpness_aware(rho), your_optimizer)`.

    Example:
      >>> opt = tx.sam(learning_rate=0.1, rho=0.05, momentum=0.9)
      >>> state = opt.init(params)
      >>> g = jax.grad(loss_fn)(params, batch)
      >>> updates, state = opt.update(g, state, params,
      ...                             grad_fn=lambda p, _: jax.grad(loss_fn)(p, batch))
      >>> params = optax.apply_updates(params, updates)
    """
    return optax.chain(
        sharpness_aware(rho, num_chunks=num_chunks, batch_axis_name=batch_axis_name),
        *_outer(learning_rate, momentum, nesterov, weight_decay))


def asam(learning_rate: optax.ScalarOrSchedule, rho: optax.ScalarOrSchedule = 0.5,
         eta: Any = 0.01, momentum: Any = 0.0, nesterov: bool = False,
         weight_decay: Any = 0.0, num_chunks: Optional[int] = None,
         batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
    """Adaptive SAM: SAM whose perturbation is ε = ρ T_w² g / ‖T_w g‖, T_w = |w| + η.

    Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks", ICML 2021 (defaults ρ = 0.5, η = 0.01 from the
    paper). See `asam_ascent`.

    Example:
      >>> opt = tx.asam(learning_rate=0.1, rho=0.5, eta=0.01, momentum=0.9)
    """
    return optax.chain(
        sharpness_aware(rho, ascent=asam_ascent(eta), num_chunks=num_chunks,
                        batch_axis_name=batch_axis_name),
        *_outer(learning_rate, momentum, nesterov, weight_decay))


def gsam(learning_rate: optax.ScalarOrSchedule, rho: optax.ScalarOrSchedule = 0.05,
         alpha: optax.ScalarOrSchedule = 0.1, momentum: Any = 0.0,
         nesterov: bool = False, weight_decay: Any = 0.0,
         num_chunks: Optional[int] = None,
         batch_axis_name: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
    """GSAM: SAM's perturbed gradient minus α times the orthogonal part of the gradient.

    Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022: the
    step direction g_p − α g_⊥ descends the perturbed loss while decreasing the
    surrogate gap L(w + ε) − L(w). The paper schedules ρ proportionally to the learning
    rate; pass a schedule as `rho` to do so. α = 0 is SAM.

    Example:
      >>> sched = optax.cosine_decay_schedule(0.1, 1000)
      >>> opt = tx.gsam(sched, rho=lambda t: 0.05 * sched(t) / 0.1, alpha=0.1)
    """
    return optax.chain(
        sharpness_aware(rho, alpha=alpha, num_chunks=num_chunks,
                        batch_axis_name=batch_axis_name),
        *_outer(learning_rate, momentum, nesterov, weight_decay))
