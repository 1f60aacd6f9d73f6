"""One training step that serves every optimizer in `transforms`."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = ["StepResult", "train_step"]


class StepResult(NamedTuple):
    """What `train_step` returns; unpacks as `params, opt_state, loss`."""
    params: Any
    opt_state: Any
    loss: jax.Array   # the mean loss at the parameters *before* the step


def _integer_scalar(value: Any, name: str) -> Any:
    dtype = getattr(value, "dtype", None)
    ok = (isinstance(value, (int, np.integer)) and not isinstance(value, bool)) or (
        dtype is not None and jnp.ndim(value) == 0 and jnp.issubdtype(dtype, jnp.integer))
    if not ok:
        raise ValueError(f"`{name}` must be an integer scalar (the global step count); "
                         f"got {value!r}.")
    return value


def train_step(optimizer: optax.GradientTransformation,
               loss_fn: Callable[[Any, Any], jax.Array], params: Any, opt_state: Any,
               batch: Any, key: jax.Array, *,
               apply_fn: Optional[Callable[[Any, Any], Any]] = None,
               step: Any = None,
               extra_args: Optional[dict] = None) -> StepResult:
    """One step of any optimizer: gradient, `optimizer.update` with its extra arguments, apply.

    The contract (what every transform in `transforms` may rely on): `train_step`
    computes `loss, g = jax.value_and_grad(loss_fn)(params, batch)` and calls
    `optimizer.update(g, opt_state, params, **extras)` with these keyword arguments,
    all built from the current `batch`:

    ============  =====================================================================
    grad_fn       `grad_fn(p, i) -> ∇loss_fn(p, batch)` (`optax.contrib.sam` opaque
                  mode's convention; SAM / ASAM / GSAM)
    obj_fn        `obj_fn(p) -> loss_fn(p, batch)` (`optax.contrib.sophia`'s convention;
                  Sophia-H, AdaHessian)
    loss_fn       the loss itself, with `batch` (m-sharpness over chunks, anything
    batch         that needs to re-slice the batch)
    apply_fn      `apply_fn(p, inputs) -> outputs` or None (K-FAC-style statistics)
    output_fn     `output_fn(p) -> apply_fn(p, batch[0])` for a batch
                  `(inputs, labels)`, or None without `apply_fn` (Sophia-G's sampled labels)
    key           a fresh `jax.random` key for this step (probes, sampled labels)
    step          the global step count, an integer scalar, only when the caller
                  gives `step=` (K-FAC's periodic refresh branches on it; inside
                  `jax.vmap` over members pass it unbatched, `in_axes=None`, so the
                  branch stays a branch instead of becoming a select)
    ============  =====================================================================

    plus anything in `extra_args`. A transform takes the ones it needs by keyword and
    must accept the rest through `**extra_args` (`optax.chain` and
    `optax.with_extra_args_support` handle plain optax transforms; `train_step` applies the
latter itself, so `optax.adam(1e-3)` works as given). Unused closures cost
    nothing under `jit`: a function that is not called is not traced, and a gradient
    nobody reads is removed by XLA. Pass a new `key` every step (e.g.
    `jax.random.fold_in(key, step)`).

    Jit it by closing over (or `functools.partial`-ing) `optimizer`, `loss_fn` and
    `apply_fn`; it is vmappable over anything else, including hyper-parameters given to
    `make` as arrays inside the vmapped function.

    Args:
      optimizer: a GradientTransformation (e.g. from `transforms.make`).
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss over `batch`.
      params, opt_state: the current point and optimizer state.
      batch: pytree with a leading example axis; `(inputs, labels)` if `apply_fn` is
        given.
      key: a `jax.random` key for this step.
      apply_fn: optional model function for output-space estimators (Sophia-G).
      step: optional global step count (an integer scalar), passed as `step`.
      extra_args: more keyword arguments for `optimizer.update`.

    Returns:
      `StepResult(params, opt_state, loss)`.

    Example:
      >>> opt = tx.make("sophia_g", learning_rate=1e-3)
      >>> state = opt.init(params)
      >>> step = jax.jit(functools.partial(tx.train_step, opt, loss_fn, apply_fn=apply_fn))
      >>> for t in range(100):
      ...     params, state, loss = step(params, state, batch, jax.random.fold_in(key, t))
    """
    def obj_fn(p):
        return loss_fn(p, batch)

    def grad_fn(p, i=0):
        del i
        return jax.grad(loss_fn)(p, batch)

    output_fn = None
    if apply_fn is not None:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError("With `apply_fn`, `batch` must be the pair (inputs, labels); "
                             f"got {type(batch).__name__}.")
        inputs = batch[0]
        output_fn = lambda p: apply_fn(p, inputs)  # noqa: E731

    extras = dict(grad_fn=grad_fn, obj_fn=obj_fn, loss_fn=loss_fn, batch=batch,
                  apply_fn=apply_fn, output_fn=output_fn, key=key)
    if step is not None:
        extras["step"] = _integer_scalar(step, "step")
    if extra_args:
        clash = sorted(set(extra_args) & set(extras))
        if clash:
            raise ValueError(f"`extra_args` may not redefine {clash}; train_step supplies "
                             "them.")
        extras.update(extra_args)

    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    optimizer = optax.with_extra_args_support(optimizer)
    updates, opt_state = optimizer.update(grads, opt_state, params, **extras)
    return StepResult(optax.apply_updates(params, updates), opt_state, loss)
