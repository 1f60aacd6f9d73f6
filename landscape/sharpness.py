"""Sharpness of a minimum: how much the loss rises when the weights are perturbed.

Every measure is a pure function of `(loss_fn, params, batch, ...)` with
`loss_fn(params, batch) -> scalar` the *mean* loss. The loss over `batch` is averaged
exactly chunk by chunk (`chunk_size` examples at a time), and the trials of the random
measures run as vmapped groups of `trials_per_chunk` inside one `lax.map`, so memory is
bounded by one chunk of examples times one group of trials, whatever the data size.

Perturbation measures (value, and where meaningful the perturbation reaching it):

- `random`: average-case sharpness E_ε[L(w+ε)] − L(w) under Gaussian noise.
- `worst_case`: ρ-sharpness max_{‖ε‖≤ρ} L(w+ε) − L(w) (SAM's inner problem), and its
  m-sharpness variant.
- `adaptive`: ASAM's adaptive sharpness, the same maximum over ‖ε / (|w|+η)‖ ≤ ρ.
- `keskar`: the ε-sharpness of Keskar et al. (2017), a box scaled by |w|+1.
- `pac_bayes`: the largest noise σ the loss tolerates (Jiang et al. 2020).

Curvature measures: `lambda_max`, `hessian_trace`, `frobenius`, and the
reparameterization-invariant `fisher_rao_norm` (Liang et al. 2019).

Use it as `ls.sharpness.worst_case(loss_fn, params, batch, rho=0.05, key=key)`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from landscape import _validate
from landscape.chunking import chunk_mean
from landscape.operators import LinearOperator, hessian
from landscape.spectrum import eigenvalues
from landscape.trace import TraceEstimate, trace

LossFn = Callable[[Any, Any], jax.Array]
_SCALES = ("tensor", "elementwise", "none")


# ----------------------------------------------------------------- results ---

class RandomSharpness(NamedTuple):
    """Average-case sharpness over `num_trials` Gaussian perturbations.

    mean: E[L(w+ε)] − L(w) estimated over the trials; max: the largest increase seen;
    std_error: standard error of `mean`; loss: L(w); increases: `(num_trials,)` each
    trial's L(w+ε) − L(w); perturbation: the ε (pytree like params) of the `max` trial.
    """

    mean: jax.Array
    max: jax.Array
    std_error: jax.Array
    loss: jax.Array
    increases: jax.Array
    perturbation: Any


class WorstCaseSharpness(NamedTuple):
    """A maximum of L(w+ε) − L(w) over a set of perturbations, found by ascent.

    value: the best increase found (a lower bound on the true maximum);
    loss: L(w); perturbed_loss: L(w+ε) at the best ε; perturbation: that ε, a pytree
    like params (None for m-sharpness, where every chunk of m examples has its own).
    """

    value: jax.Array
    loss: jax.Array
    perturbed_loss: jax.Array
    perturbation: Any


class PacBayesFlatness(NamedTuple):
    """The largest noise level the loss tolerates.

    sigma: the largest σ found with E[L(w+ε)] − L(w) ≤ threshold; flatness: 1/σ²
    (Jiang et al.'s measure: large means sharp); increase: E[L(w+ε)] − L(w) at `sigma`;
    loss: L(w).
    """

    sigma: jax.Array
    flatness: jax.Array
    increase: jax.Array
    loss: jax.Array


# ----------------------------------------------------------------- helpers ---

def _positive(value: Any, name: str) -> jax.Array:
    """`_validate.positive` (the shared check; traced values pass), as an array."""
    return jnp.asarray(_validate.positive(value, name))


def _nonnegative(value: Any, name: str) -> jax.Array:
    return jnp.asarray(_validate.nonnegative(value, name))


def _check(loss_fn: LossFn, params: Any, batch: Any, chunk_size: int | None) -> None:
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable `loss_fn(params, batch)`; got "
                         f"{type(loss_fn).__name__}.")
    n = _validate.num_examples(batch)
    if chunk_size is not None:
        _validate.positive_int(chunk_size, "chunk_size")
    if not jax.tree.leaves(params):
        raise ValueError("`params` has no array leaves.")
    first = jax.tree.map(lambda x: x[: min(n, chunk_size or n)], batch)
    out = jax.eval_shape(loss_fn, params, first)
    if getattr(out, "shape", None) != ():
        raise ValueError("`loss_fn` must return a scalar (the mean loss over the batch); "
                         f"it returned {getattr(out, 'shape', type(out).__name__)}.")


def _mean_loss(loss_fn, params, batch, chunk_size):
    return chunk_mean(lambda b, i: loss_fn(params, b), batch, chunk_size)


def _noise_scale(params: Any, scale: str, eta: jax.Array) -> Any:
    """Per-element standard deviation factor c so that ε = ρ · c ⊙ z, z ~ N(0, I)."""
    if scale == "none":
        return jax.tree.map(jnp.ones_like, params)
    if scale == "elementwise":
        return jax.tree.map(lambda p: jnp.abs(p) + eta, params)
    # Per tensor: E‖ε_t‖² = ρ²‖p_t‖², a relative perturbation of size ρ in each tensor.
    return jax.tree.map(
        lambda p: jnp.full_like(p, jnp.linalg.norm(p.ravel()) / math.sqrt(max(p.size, 1))),
        params)


def _group(value: int | None, total: int, name: str) -> int:
    """Trials evaluated together under `vmap`: on CPU one at a time was fastest in
    `benchmarks/bench_surfaces.py` (vmapping over weights turns matmuls into slower
    batched ones); on accelerators a group fills the device."""
    if value is None:
        value = 1 if jax.default_backend() == "cpu" else 32
    return min(_validate.positive_int(value, name), total)


def _std_error(x: jax.Array) -> jax.Array:
    n = x.shape[0]
    if n < 2:
        return jnp.full((), jnp.nan, x.dtype)
    return jnp.std(x, ddof=1) / jnp.sqrt(n)


# ------------------------------------------------------------ random (average) ---

@functools.partial(jax.jit, static_argnames=("loss_fn", "num_trials", "scale",
                                             "chunk_size", "trials_per_chunk"))
def _random(loss_fn, params, batch, key, rho, eta, *, num_trials, scale, chunk_size,
            trials_per_chunk):
    c = _noise_scale(params, scale, eta)
    keys = jax.random.split(key, num_trials)

    def eps(k):
        z = optax.tree.random_like(k, params)
        return jax.tree.map(lambda zi, ci: rho * ci * zi, z, c)

    def trial(k):
        e = eps(k)
        return _mean_loss(loss_fn, optax.tree.add(params, e), batch, chunk_size)

    base = _mean_loss(loss_fn, params, batch, chunk_size)
    inc = jax.lax.map(trial, keys, batch_size=trials_per_chunk) - base
    best = jnp.argmax(inc)
    return RandomSharpness(inc.mean(), inc[best], _std_error(inc), base, inc,
                           eps(keys[best]))


def random(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
           rho: float = 0.05, num_trials: int = 16, scale: str = "tensor",
           eta: float = 0.0, chunk_size: int | None = None,
           trials_per_chunk: int | None = None) -> RandomSharpness:
    """Average-case sharpness E_ε[L(w+ε)] − L(w) under Gaussian weight noise.

    The noise is ε = ρ · c ⊙ z with z ~ N(0, I) and, by `scale`:

    - `"tensor"` (default): c = ‖p‖/√size(p) for each tensor p, so each tensor is
      perturbed by a relative amount ρ (E‖ε_p‖² = ρ²‖p‖²);
    - `"elementwise"`: c = |w| + η, the average-case adaptive sharpness
      (Andriushchenko et al. 2023), invariant to layer rescaling when η = 0;
    - `"none"`: c = 1, so ε ~ N(0, ρ² I) and, for small ρ near a minimum, the mean is
      ≈ ρ² tr(H) / 2.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss.
      params: the point w, any pytree of arrays.
      batch: pytree with a shared leading example axis (may be a whole dataset).
      key: PRNG key; trial i uses `jax.random.split(key, num_trials)[i]`.
      rho: noise level ρ > 0.
      num_trials: number of noise draws.
      chunk_size: examples per chunk of the loss (None: all at once).
      trials_per_chunk: trials vmapped together; memory grows with it (default 1 on
        CPU, where it measured fastest, and 32 on accelerators).

    Returns:
      `RandomSharpness(mean, max, std_error, loss, increases, perturbation)`.

    Example:
      >>> s = ls.sharpness.random(loss_fn, params, (x, y), key=jax.random.key(0),
      ...                         rho=0.05, num_trials=32, chunk_size=1000)
      >>> s.mean, s.max
    """
    _check(loss_fn, params, batch, chunk_size)
    _validate.choice(scale, "scale", _SCALES)
    num_trials = _validate.positive_int(num_trials, "num_trials")
    trials_per_chunk = _group(trials_per_chunk, num_trials, "trials_per_chunk")
    out = _random(loss_fn, params, batch, key, _positive(rho, "rho"),
                  _nonnegative(eta, "eta"), num_trials=num_trials, scale=scale,
                  chunk_size=chunk_size, trials_per_chunk=trials_per_chunk)
    _validate.check_finite("The loss", out.mean, out.loss)
    return out


# --------------------------------------------------- worst case (ascent in a ball) ---

def _best_ascent(loss_fn, params, batch, c, u0, step_fn, num_steps, chunk_size):
    """Ascend L(w + c⊙u) from `u0` with `u ← step_fn(u, ∇_u L)`; keep the best iterate.

    Returns `(best loss, best u)`. Every iterate, the last included, is evaluated, so the
    result is the largest loss the ascent saw (a lower bound on the true maximum).
    """
    def value_and_grad(u):
        def per_chunk(b, i):
            return jax.value_and_grad(
                lambda uu: loss_fn(optax.tree.add(params, optax.tree.mul(c, uu)), b))(u)
        return chunk_mean(per_chunk, batch, chunk_size)

    def keep_best(u, val, best_val, best_u):
        val = val.astype(best_val.dtype)
        better = val > best_val
        return jnp.where(better, val, best_val), optax.tree.where(better, u, best_u)

    def body(carry, _):
        u, best_val, best_u = carry
        val, g = value_and_grad(u)
        best_val, best_u = keep_best(u, val, best_val, best_u)
        return (step_fn(u, g), best_val, best_u), None

    init = (u0, jnp.asarray(-jnp.inf, jnp.result_type(*jax.tree.leaves(params))), u0)
    (u, best_val, best_u), _ = jax.lax.scan(body, init, None, length=num_steps)
    val = _mean_loss(loss_fn, optax.tree.add(params, optax.tree.mul(c, u)), batch,
                     chunk_size)
    return keep_best(u, val, best_val, best_u)


def _l2_ascent(loss_fn, params, batch, c, key, rho, step, num_steps, chunk_size):
    """Projected normalized gradient ascent of L(w + c⊙u) over ‖u‖₂ ≤ ρ.

    Working in u = ε / c makes the ball round, so ASAM's ellipsoid and the plain ball
    share the code, and a rescaling of w that rescales c identically leaves every
    iterate unchanged.
    """
    def project(u):
        return optax.tree.scale(jnp.minimum(1.0, rho / jnp.maximum(optax.tree.norm(u), 1e-300)), u)

    def step_fn(u, g):
        gn = optax.tree.norm(g)
        return project(optax.tree.add_scale(u, step / jnp.where(gn > 0, gn, 1.0), g))

    z = optax.tree.random_like(key, params)
    u0 = optax.tree.scale(rho / optax.tree.norm(z), z)
    best_val, best_u = _best_ascent(loss_fn, params, batch, c, u0, step_fn, num_steps,
                                    chunk_size)
    return best_val, optax.tree.mul(c, best_u)


@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps", "chunk_size", "m",
                                             "adaptive_scale"))
def _worst_case(loss_fn, params, batch, key, rho, step, eta, *, num_steps, chunk_size, m,
                adaptive_scale):
    if adaptive_scale:
        c = jax.tree.map(lambda p: jnp.abs(p) + eta, params)
    else:
        c = jax.tree.map(jnp.ones_like, params)
    if m is None:
        base = _mean_loss(loss_fn, params, batch, chunk_size)
        best, eps = _l2_ascent(loss_fn, params, batch, c, key, rho, step, num_steps,
                               chunk_size)
        # ε = 0 is in the ball and the ascent starts on its sphere: at a strict maximum
        # every iterate is below L(w), and the maximum is 0 at ε = 0.
        eps = optax.tree.where(best > base, eps, optax.tree.zeros_like(eps))
        best = jnp.maximum(best, base)
        return WorstCaseSharpness(best - base, base, best, eps)

    # m-sharpness: every disjoint chunk of m examples gets its own perturbation.
    def per_chunk(b, i):
        base = loss_fn(params, b)
        best, _ = _l2_ascent(loss_fn, params, b, c, jax.random.fold_in(key, i), rho,
                             step, num_steps, None)
        return base, jnp.maximum(best, base)

    base, best = chunk_mean(per_chunk, batch, m)
    return WorstCaseSharpness(best - base, base, best, None)


def worst_case(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
               rho: float = 0.05, num_steps: int = 20, step_size: float | None = None,
               m: int | None = None, chunk_size: int | None = None) -> WorstCaseSharpness:
    """ρ-sharpness: max_{‖ε‖₂ ≤ ρ} L(w+ε) − L(w), by projected gradient ascent.

    This is the inner maximization of SAM (Foret et al. 2021, "Sharpness-Aware
    Minimization for Efficiently Improving Generalization"). Starting from a random
    point of the sphere of radius ρ, each of `num_steps` steps moves ε by `step_size`
    (default ρ) along the normalized gradient of L(w+ε) and projects back onto the
    ball; the best iterate is returned, a lower bound on the maximum. Near a minimum
    with Hessian H the value is ≈ ρ² λ_max(H) / 2.

    With `m`, the m-sharpness of Foret et al.: the batch is cut into chunks of `m`
    examples, each chunk's loss is maximized with its own ε, and the increases are
    averaged (a shorter last chunk counts by its size).

    Args:
      key: PRNG key for the starting point(s).
      rho: radius ρ > 0.
      num_steps: gradient evaluations in the ascent.
      step_size: ℓ2 length of each ascent step (default ρ).
      m: examples per chunk for m-sharpness (None: the whole batch at once).
      chunk_size: examples per chunk of the loss and gradient (ignored with `m`).

    Returns:
      `WorstCaseSharpness(value, loss, perturbed_loss, perturbation)`.

    Example:
      >>> s = ls.sharpness.worst_case(loss_fn, params, (x, y), key=jax.random.key(0),
      ...                             rho=0.05, num_steps=10)
      >>> s.value, s.perturbation
    """
    return _run_ascent(loss_fn, params, batch, key, rho, num_steps, step_size, m,
                       chunk_size, None)


def adaptive(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
             rho: float = 0.5, eta: float = 0.01, num_steps: int = 20,
             step_size: float | None = None, m: int | None = None,
             chunk_size: int | None = None) -> WorstCaseSharpness:
    """Adaptive sharpness: max over ‖ε / (|w| + η)‖₂ ≤ ρ of L(w+ε) − L(w).

    Kwon et al. 2021 ("ASAM: Adaptive Sharpness-Aware Minimization for Scale-Invariant
    Learning of Deep Neural Networks"): the perturbation is scaled elementwise by
    T_w = |w| + η. With η = 0 the measure is invariant to any rescaling of the weights
    that leaves the function unchanged, such as multiplying one ReLU layer by α and the
    next by 1/α (Dinh et al. 2017), which moves λ_max by about α². Every parameter,
    biases included, is scaled by its own magnitude. The ascent is `worst_case`'s, in
    the coordinates u = ε / T_w.

    Args: as `worst_case`, plus `eta` (η ≥ 0; ASAM uses 0.01) and ρ defaulting to
    ASAM's 0.5.

    Example:
      >>> s = ls.sharpness.adaptive(loss_fn, params, (x, y), key=jax.random.key(0),
      ...                           rho=0.5, eta=0.0)
      >>> s.value
    """
    return _run_ascent(loss_fn, params, batch, key, rho, num_steps, step_size, m,
                       chunk_size, _nonnegative(eta, "eta"))


def _run_ascent(loss_fn, params, batch, key, rho, num_steps, step_size, m, chunk_size,
                eta):
    _check(loss_fn, params, batch, chunk_size)
    rho = _positive(rho, "rho")
    step = rho if step_size is None else _positive(step_size, "step_size")
    num_steps = _validate.positive_int(num_steps, "num_steps")
    if m is not None:
        m = _validate.positive_int(m, "m")
    out = _worst_case(loss_fn, params, batch, key, rho, step,
                      jnp.zeros(()) if eta is None else eta, num_steps=num_steps,
                      chunk_size=chunk_size, m=m, adaptive_scale=eta is not None)
    _validate.check_finite("The loss", out.value, out.loss)
    return out


# ------------------------------------------------------------------- Keskar ---

@functools.partial(jax.jit, static_argnames=("loss_fn", "num_steps", "chunk_size"))
def _keskar(loss_fn, params, batch, key, epsilon, step, *, num_steps, chunk_size):
    c = jax.tree.map(lambda p: epsilon * (jnp.abs(p) + 1.0), params)

    # Sign-gradient ascent in the unit box u ∈ [-1, 1]^n (ε = c ⊙ u): the steepest
    # ascent direction for an ℓ∞ ball, and it reaches the box's corners in a few steps.
    u0 = optax.tree.random_like(key, params, jax.random.uniform)
    u0 = jax.tree.map(lambda x: 2.0 * x - 1.0, u0)

    def step_fn(u, g):
        return jax.tree.map(lambda x, gx: jnp.clip(x + step * jnp.sign(gx), -1.0, 1.0),
                            u, g)

    best_val, best_u = _best_ascent(loss_fn, params, batch, c, u0, step_fn, num_steps,
                                    chunk_size)
    base = _mean_loss(loss_fn, params, batch, chunk_size)
    value = 100.0 * (best_val - base) / (1.0 + base)
    return WorstCaseSharpness(value, base, best_val, optax.tree.mul(c, best_u))


def keskar(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
           epsilon: float = 1e-3, num_steps: int = 20, step_size: float = 0.25,
           chunk_size: int | None = None) -> WorstCaseSharpness:
    """The ε-sharpness of Keskar et al. 2017 ("On Large-Batch Training for Deep
    Learning: Generalization Gap and Sharp Minima"), in the full parameter space:

        100 · (max_{ε ∈ C} L(w+ε) − L(w)) / (1 + L(w)),
        C = {ε : |ε_i| ≤ epsilon · (|w_i| + 1)}.

    The paper maximizes with L-BFGS-B; here projected sign-gradient ascent runs in the
    box from a random point, keeping the best iterate (a lower bound). The value is a
    percentage, as in the paper.

    Args:
      epsilon: box size (the paper uses 1e-3 and 5e-4).
      num_steps: gradient evaluations; step_size: step in units of the box half-width.

    Returns:
      `WorstCaseSharpness` whose `value` is the percentage above.

    Example:
      >>> ls.sharpness.keskar(loss_fn, params, (x, y), key=jax.random.key(0)).value
    """
    _check(loss_fn, params, batch, chunk_size)
    out = _keskar(loss_fn, params, batch, key, _positive(epsilon, "epsilon"),
                  _positive(step_size, "step_size"),
                  num_steps=_validate.positive_int(num_steps, "num_steps"),
                  chunk_size=chunk_size)
    _validate.check_finite("The loss", out.value, out.loss)
    return out


# --------------------------------------------------------------- PAC-Bayes ---

@functools.partial(jax.jit, static_argnames=("loss_fn", "num_samples", "num_bisection",
                                             "magnitude_aware", "chunk_size",
                                             "trials_per_chunk"))
def _pac_bayes(loss_fn, params, batch, key, threshold, lo, hi, floor, *, num_samples,
               num_bisection, magnitude_aware, chunk_size, trials_per_chunk):
    # The same noise draws serve every σ (common random numbers), so the estimated
    # increase is a smooth function of σ and the bisection sees no sampling jitter.
    keys = jax.random.split(key, num_samples)
    base = _mean_loss(loss_fn, params, batch, chunk_size)

    def increase(sigma):
        def one(k):
            z = optax.tree.random_like(k, params)
            if magnitude_aware:
                eps = jax.tree.map(
                    lambda zi, p: zi * jnp.sqrt(sigma**2 * p**2 + floor**2), z, params)
            else:
                eps = optax.tree.scale(sigma, z)
            return _mean_loss(loss_fn, optax.tree.add(params, eps), batch, chunk_size)
        return jax.lax.map(one, keys, batch_size=trials_per_chunk).mean() - base

    inc_lo, inc_hi = increase(lo), increase(hi)

    def body(_, bracket):
        a, b, inc_a = bracket
        mid = jnp.sqrt(a * b)  # bisect in log σ: the bracket spans decades
        inc = increase(mid)
        ok = inc <= threshold
        return jnp.where(ok, mid, a), jnp.where(ok, b, mid), jnp.where(ok, inc, inc_a)

    sigma, _, inc = jax.lax.fori_loop(0, num_bisection, body, (lo, hi, inc_lo))
    return PacBayesFlatness(sigma, 1.0 / sigma**2, inc, base), inc_lo, inc_hi


def pac_bayes(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
              threshold: float = 0.1, magnitude_aware: bool = False,
              num_samples: int = 16, sigma_min: float = 1e-6, sigma_max: float = 10.0,
              num_bisection: int = 30, floor: float = 1e-3,
              chunk_size: int | None = None,
              trials_per_chunk: int | None = None) -> PacBayesFlatness:
    """PAC-Bayes flatness (Jiang et al. 2020, "Fantastic Generalization Measures and
    Where to Find Them"): the largest σ with E_ε[L(w+ε)] − L(w) ≤ threshold.

    - plain: ε ~ N(0, σ² I); the measure is 1/σ² (`flatness`).
    - `magnitude_aware=True`: ε_i ~ N(0, σ² w_i² + floor²), noise relative to each
      weight's magnitude (Jiang et al.'s σ' with ε = `floor`).

    The expectation is a Monte-Carlo mean over `num_samples` draws, the same draws for
    every σ; σ is found by bisection in log σ between `sigma_min` and `sigma_max`.
    Jiang et al. threshold the change in training *accuracy* (0.1): pass a 0-1 loss
    (`1 - accuracy`) as `loss_fn` for that reading.

    Raises:
      ValueError: if the threshold is already exceeded at `sigma_min` (unreachable) or
        not reached at `sigma_max` (lower `sigma_min` / raise `sigma_max`). The check
        needs concrete values and is skipped under an outer `jax.jit`.

    Example:
      >>> pb = ls.sharpness.pac_bayes(loss_fn, params, (x, y), key=jax.random.key(0),
      ...                             threshold=0.05)
      >>> pb.sigma, pb.flatness
    """
    _check(loss_fn, params, batch, chunk_size)
    threshold = _positive(threshold, "threshold")
    lo, hi = _positive(sigma_min, "sigma_min"), _positive(sigma_max, "sigma_max")
    if _validate.is_concrete(lo, hi) and not bool(lo < hi):
        raise ValueError(f"`sigma_min` ({sigma_min}) must be below `sigma_max` "
                         f"({sigma_max}).")
    num_samples = _validate.positive_int(num_samples, "num_samples")
    trials_per_chunk = _group(trials_per_chunk, num_samples, "trials_per_chunk")
    dtype = jnp.result_type(*jax.tree.leaves(params))
    out, inc_lo, inc_hi = _pac_bayes(
        loss_fn, params, batch, key, threshold.astype(dtype), lo.astype(dtype),
        hi.astype(dtype), _nonnegative(floor, "floor").astype(dtype),
        num_samples=num_samples,
        num_bisection=_validate.positive_int(num_bisection, "num_bisection"),
        magnitude_aware=bool(magnitude_aware), chunk_size=chunk_size,
        trials_per_chunk=trials_per_chunk)
    _validate.check_finite("The loss", out.loss)
    if _validate.is_concrete(inc_lo, inc_hi, threshold):
        if not bool(inc_lo <= threshold):
            raise ValueError(
                f"`threshold`={float(threshold)} is unreachable: the loss already rises "
                f"by {float(inc_lo):.4g} at `sigma_min`={sigma_min}. Raise the threshold "
                "or lower sigma_min.")
        if not bool(inc_hi > threshold):
            raise ValueError(
                f"The loss rises by only {float(inc_hi):.4g} at `sigma_max`={sigma_max}, "
                f"below `threshold`={float(threshold)}: raise sigma_max.")
    return out


# ------------------------------------------------------------- curvature ---

def lambda_max(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
               chunk_size: int | None = None, num_steps: int | None = None) -> jax.Array:
    """Largest Hessian eigenvalue λ_max, by Lanczos (`ls.eigenvalues`).

    Example:
      >>> ls.sharpness.lambda_max(loss_fn, params, (x, y), key=jax.random.key(0))
    """
    H = hessian(loss_fn, params, batch, chunk_size=chunk_size)
    return eigenvalues(H, k=1, key=key, num_steps=num_steps).values[0]


def hessian_trace(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
                  num_probes: int = 100, method: str = "hutch++",
                  chunk_size: int | None = None) -> TraceEstimate:
    """tr(H), by Hutch++ or Hutchinson (`ls.trace`).

    Example:
      >>> ls.sharpness.hessian_trace(loss_fn, params, (x, y), key=key).value
    """
    H = hessian(loss_fn, params, batch, chunk_size=chunk_size)
    return trace(H, key=key, num_probes=num_probes, method=method)


def frobenius(loss_fn: LossFn, params: Any, batch: Any, *, key: jax.Array,
              num_probes: int = 60, method: str = "hutch++",
              chunk_size: int | None = None) -> TraceEstimate:
    """‖H‖_F = √tr(H²), with tr(H²) estimated by `ls.trace` on the operator H·H.

    Each probe costs two Hessian-vector products. The standard error is carried from
    tr(H²) to its square root to first order: se/(2‖H‖_F).

    Example:
      >>> ls.sharpness.frobenius(loss_fn, params, (x, y), key=key).value
    """
    H = hessian(loss_fn, params, batch, chunk_size=chunk_size)
    est = trace(LinearOperator(lambda v: H.matvec(H.matvec(v)), params), key=key,
                num_probes=num_probes, method=method)
    value = jnp.sqrt(jnp.maximum(est.value, 0.0))
    return TraceEstimate(value, est.std_error / (2.0 * value), 2 * est.num_matvecs)


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _fisher_rao(loss_fn, params, batch, *, chunk_size):
    def per_chunk(b, i):
        def one(example):
            single = jax.tree.map(lambda x: x[None], example)
            return jax.jvp(lambda p: loss_fn(p, single), (params,), (params,))[1]
        return jnp.mean(jax.vmap(one)(b) ** 2)
    return jnp.sqrt(chunk_mean(per_chunk, batch, chunk_size))


def fisher_rao_norm(loss_fn: LossFn, params: Any, batch: Any, *,
                    chunk_size: int | None = None) -> jax.Array:
    """The (empirical) Fisher-Rao norm √(mean_i ⟨w, ∇_w ℓ_i(w)⟩²) (Liang et al. 2019,
    "Fisher-Rao Metric, Geometry, and Complexity of Neural Networks").

    ⟨w, ∇ℓ_i⟩ is the derivative of example i's loss along the ray t ↦ (1+t)w, one
    forward-mode product per example; `loss_fn` is called on one-example batches. For
    a bias-free ReLU network of depth L+1 it equals (L+1)⟨∂ℓ/∂f, f⟩, and it is
    unchanged by rescalings that keep the function (per-layer ReLU rescaling), unlike
    λ_max. Targets are the data's labels (the empirical variant).

    Example:
      >>> ls.sharpness.fisher_rao_norm(loss_fn, params, (x, y), chunk_size=500)
    """
    _check(loss_fn, params, batch, chunk_size)
    out = _fisher_rao(loss_fn, params, batch, chunk_size=chunk_size)
    _validate.check_finite("The loss", out)
    return out
