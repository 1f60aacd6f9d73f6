"""Mode connectivity: the loss along paths between two solutions.

`linear_barrier` measures the straight path (Frankle et al. 2020, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis"); `connect` trains a low-loss curve
between the two (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs"; Draxler et al. 2018).

The barrier of a path φ(t), t ∈ [0, 1], is

    B = max_t [ L(φ(t)) − ((1 − t) L(φ(0)) + t L(φ(1))) ],

the largest rise above the straight line between the endpoint losses (the definition
of Entezari et al. 2022, "The Role of Permutation Invariance in Linear Mode
Connectivity"). Frankle et al. 2020 subtract the *mean* of the endpoint losses instead;
results carry that value as `barrier_mean`. Both agree when the endpoints' losses are
equal, and both are taken over the evaluated grid of t.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from landscape import _validate
from landscape.chunking import chunk_mean
from landscape.surfaces import interpolate

Fn = Callable[[Any, Any], jax.Array]
_KINDS = ("bezier", "polychain")


def _barriers(t: jax.Array, loss: jax.Array) -> tuple[jax.Array, jax.Array]:
    line = (1 - t) * loss[0] + t * loss[-1]
    return jnp.max(loss - line), jnp.max(loss) - 0.5 * (loss[0] + loss[-1])


def _grid(num_points: int) -> jax.Array:
    num_points = _validate.positive_int(num_points, "num_points")
    if num_points < 2:
        raise ValueError(f"`num_points` must be at least 2 (the endpoints); got {num_points}.")
    return jnp.linspace(0.0, 1.0, num_points)


class LinearPath(NamedTuple):
    """The loss along (1 − t)·params_a + t·params_b.

    t, loss, metric: `(num_points,)` (metric None unless asked).
    barrier: max over t of the loss above the line between the endpoint losses.
    barrier_mean: max over t of the loss minus the endpoints' mean (Frankle et al.).
    """

    t: jax.Array
    loss: jax.Array
    metric: jax.Array | None
    barrier: jax.Array
    barrier_mean: jax.Array


def linear_barrier(loss_fn: Fn, params_a: Any, params_b: Any, batch: Any, *,
                   num_points: int = 21, metric: Fn | None = None,
                   chunk_size: int | None = None) -> LinearPath:
    """The loss along the straight path between two solutions, and its barrier.

    The barrier is max_t [L(t) − ((1 − t) L(0) + t L(1))] over `num_points` evenly
    spaced t in [0, 1] (see the module docstring; `barrier_mean` is Frankle et al.
    2020's "maximum minus the mean of the endpoints"). A barrier near 0 means the two
    solutions are linearly mode connected.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss.
      params_a, params_b: the endpoints, pytrees of the same structure.
      batch: examples (leading example axis), evaluated at every t.
      num_points: points on the path, endpoints included (>= 2).
      metric: optional `fn(params, batch) -> scalar mean` (accuracy, say) along t.
      chunk_size: examples per chunk.

    Example:
      >>> path = ls.linear_barrier(loss_fn, params_seed0, params_seed1, (x, y))
      >>> float(path.barrier), path.loss.argmax()
    """
    t = _grid(num_points)
    c = interpolate(loss_fn, params_a, params_b, batch, alphas=t, metric_fn=metric,
                    chunk_size=chunk_size)
    return LinearPath(t, c.train_loss, c.train_metric, *_barriers(t, c.train_loss))


# ------------------------------------------------------------------ curves ---

def curve_point(kind: str, params_a: Any, control: Any, params_b: Any, t: Any) -> Any:
    """The point φ(t) of a curve with one free control point `control`.

    `"bezier"`: the quadratic Bezier curve (1 − t)² a + 2t(1 − t) θ + t² b.
    `"polychain"`: the broken line a → θ → b, θ reached at t = ½.
    Both are exactly a at t = 0 and b at t = 1 (each piece is anchored at its endpoint).
    """
    t = jnp.asarray(t)
    if kind == "bezier":
        return jax.tree.map(
            lambda a, c, b: ((1 - t) ** 2 * a + 2 * t * (1 - t) * c + t ** 2 * b).astype(a.dtype),
            params_a, control, params_b)
    return jax.tree.map(
        lambda a, c, b: jnp.where(t < 0.5, a + 2 * t * (c - a),
                                  b + 2 * (1 - t) * (c - b)).astype(a.dtype),
        params_a, control, params_b)


class Connection(NamedTuple):
    """A trained curve between two solutions (from `connect`).

    t, loss, metric: the grid of t and the mean loss (and metric, or None) on `data`.
    barrier, barrier_mean: as in `LinearPath`, along the curve.
    train_loss: `(steps,)`, the minibatch loss at each training step's sampled t.
    kind, params_a, control, params_b: the curve; `params_at(t)` gives its point.
    """

    t: jax.Array
    loss: jax.Array
    metric: jax.Array | None
    barrier: jax.Array
    barrier_mean: jax.Array
    train_loss: jax.Array
    kind: str
    params_a: Any
    control: Any
    params_b: Any

    def params_at(self, t: Any) -> Any:
        """The curve's parameters at `t` in [0, 1]."""
        return curve_point(self.kind, self.params_a, self.control, self.params_b, t)

    def along(self, fn: Fn, batch: Any, t: Any = None, chunk_size: int | None = None):
        """`fn(params, batch)` at each t of `t` (default: the curve's grid), e.g. the
        test accuracy along the curve."""
        t = self.t if t is None else jnp.asarray(t)
        return _along(fn, self.kind, self.params_a, self.control, self.params_b, t,
                      batch, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("fn", "kind", "chunk_size"))
def _along(fn, kind, a, control, b, ts, batch, *, chunk_size):
    def one(t):
        p = curve_point(kind, a, control, b, t)
        return chunk_mean(lambda chunk, i: fn(p, chunk), batch, chunk_size)

    return jax.lax.map(one, ts)


@functools.partial(jax.jit, static_argnames=("loss_fn", "kind", "optimizer", "steps",
                                             "batch_size", "t_samples"))
def _train(loss_fn, kind, optimizer, a, b, control, data, key, *, steps, batch_size,
           t_samples):
    n = jax.tree.leaves(data)[0].shape[0]

    def objective(c, ts, batch):
        return jnp.mean(jax.lax.map(lambda t: loss_fn(curve_point(kind, a, c, b, t), batch),
                                    ts))

    def step(carry, k):
        c, opt_state = carry
        k_t, k_b = jax.random.split(k)
        t = jax.random.uniform(k_t, (t_samples,), dtype=jax.tree.leaves(a)[0].dtype)
        batch = data
        if batch_size is not None:
            idx = jax.random.choice(k_b, n, (batch_size,), replace=False)
            batch = jax.tree.map(lambda x: x[idx], data)
        loss, g = jax.value_and_grad(objective)(c, t, batch)
        updates, opt_state = optimizer.update(g, opt_state, c)
        return (optax.apply_updates(c, updates), opt_state), loss

    init = (control, optimizer.init(control))
    (control, _), losses = jax.lax.scan(step, init, jax.random.split(key, steps))
    return control, losses


def _init_control(kind, params_a, params_b, key, jitter):
    """The midpoint of the segment (Garipov et al.'s start), nudged by noise of
    relative size `jitter`: at the exact midpoint a symmetric loss can have zero
    gradient across the segment, a saddle the curve would never leave."""
    leaves_a, treedef = jax.tree.flatten(params_a)
    keys = jax.random.split(key, len(leaves_a))
    leaves_b = treedef.flatten_up_to(params_b)
    out = []
    for k, a, b in zip(keys, leaves_a, leaves_b):
        a, b = jnp.asarray(a), jnp.asarray(b)
        scale = jitter * (jnp.sqrt(jnp.mean((b - a) ** 2)) + jnp.finfo(a.dtype).eps)
        out.append(0.5 * (a + b) + scale * jax.random.normal(k, a.shape, a.dtype))
    return treedef.unflatten(out)


def connect(loss_fn: Fn, params_a: Any, params_b: Any, data: Any, *, key: jax.Array,
            kind: str = "bezier", steps: int = 1000,
            optimizer: optax.GradientTransformation | None = None,
            batch_size: int | None = None, metric: Fn | None = None,
            t_samples: int = 1, num_points: int = 21, jitter: float = 1e-2,
            chunk_size: int | None = None) -> Connection:
    """Train a low-loss curve between two solutions (Garipov et al. 2018).

    The curve has one free control point θ (`curve_point`): a quadratic Bezier curve
    or a polygonal chain with one bend. θ starts at the segment's midpoint (plus
    `jitter` noise) and is trained on E_{t~U[0,1]} L(φ_θ(t)) (Garipov et al.'s objective
    with the uniform distribution on t): each step samples one minibatch of `batch_size`
    examples (without replacement; None: all of `data`) and `t_samples` values of t
    (Garipov et al. take one; more average the loss over several points of the curve
    and lower the gradient's noise), and applies `optimizer` to θ. The endpoints stay
    fixed. All `steps` run in one jitted `lax.scan`. Afterwards the loss (and `metric`)
    on all of `data` is evaluated at `num_points` evenly spaced t, and the barrier is
    taken as in `linear_barrier`.

    Garipov et al. report, on CIFAR-10, test error at the curve's worst point within
    0.2–1 point of the endpoints' (a straight path between the same solutions meets a
    high barrier).

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss.
      params_a, params_b: the endpoints.
      data: training examples (leading example axis).
      key: PRNG key for θ's start, the sampled t and the minibatches.
      kind: `"bezier"` or `"polychain"`.
      steps: optimizer steps.
      optimizer: an optax transformation for θ (default `optax.adam(1e-2)`).
      batch_size: examples per step (None: full batch).
      t_samples: points t sampled per step (each costs one gradient on the minibatch).
      metric: optional `fn(params, batch) -> scalar mean` evaluated along the curve.
      num_points: evaluation points on the curve, endpoints included.
      jitter: relative size of the noise added to θ's midpoint start.
      chunk_size: examples per chunk in the final evaluation.

    Returns:
      `Connection`; `.params_at(t)` gives the curve's parameters at any t, and
      `.along(fn, batch)` evaluates any function (test accuracy, say) along it.

    Example:
      >>> curve = ls.connect(loss_fn, params_a, params_b, (x, y), key=jax.random.key(0),
      ...                    steps=2000, batch_size=128, metric=accuracy_fn)
      >>> float(curve.barrier), float(ls.linear_barrier(loss_fn, params_a, params_b,
      ...                                               (x, y)).barrier)
      >>> test_acc = curve.along(accuracy_fn, (x_test, y_test))
    """
    _validate.choice(kind, "kind", _KINDS)
    _validate.same_structure(params_b, params_a, name="params_b", like_name="params_a")
    n = _validate.num_examples(data, "data")
    steps = _validate.positive_int(steps, "steps")
    t_samples = _validate.positive_int(t_samples, "t_samples")
    if batch_size is not None and _validate.positive_int(batch_size, "batch_size") > n:
        raise ValueError(f"`batch_size` ({batch_size}) exceeds the {n} examples in `data`.")
    if optimizer is None:
        optimizer = optax.adam(1e-2)
    if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
        raise ValueError("`optimizer` must be an optax GradientTransformation; got "
                         f"{type(optimizer).__name__}.")
    if not jitter >= 0:
        raise ValueError(f"`jitter` must be >= 0; got {jitter!r}.")
    t = _grid(num_points)
    k_init, k_train = jax.random.split(key)
    control = _init_control(kind, params_a, params_b, k_init, jitter)
    control, losses = _train(loss_fn, kind, optimizer, params_a, params_b, control, data,
                             k_train, steps=steps, batch_size=batch_size,
                             t_samples=t_samples)
    _validate.check_finite("Training the curve", losses)
    loss = _along(loss_fn, kind, params_a, control, params_b, t, data, chunk_size=chunk_size)
    values = None if metric is None else _along(metric, kind, params_a, control, params_b,
                                                t, data, chunk_size=chunk_size)
    return Connection(t, loss, values, *_barriers(t, loss), losses, kind, params_a,
                      control, params_b)
