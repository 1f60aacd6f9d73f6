"""Gradient noise: how much per-example gradients disagree with their mean.

- `gradient_noise_scale`: the simple noise scale B = tr(Σ)/‖G‖² of McCandlish et al.
  2018 ("An Empirical Model of Large-Batch Training"), the batch size beyond which
  larger batches stop paying off.
- `gradient_snr`: the gradient signal-to-noise ratio of each parameter,
  E[g_j]² / Var[g_j] (Liu et al. 2020, "Understanding Why Neural Networks Generalize
  Well Through GSNR of Parameters").
- `minibatch_variance`: E‖g_B − G‖² of mini-batch gradients as a function of the
  batch size B, measured by sampling and predicted from Σ.

Per-example gradients are formed one chunk of `chunk_size` examples at a time and
reduced to their mean and elementwise second moment, so memory is chunk × parameters.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from landscape import _validate
from landscape.chunking import chunk_mean

LossFn = Callable[[Any, Any], jax.Array]


class NoiseScale(NamedTuple):
    """simple: B_simple = trace_cov / grad_sq_norm; trace_cov: tr(Σ), the per-example
    gradient covariance's trace (unbiased, N − 1 in the denominator); grad_sq_norm:
    the unbiased estimate ‖Ḡ‖² − tr(Σ)/N of ‖G‖² (McCandlish et al., appendix A);
    mean_grad_sq_norm: ‖Ḡ‖² of the batch's mean gradient; num_examples: N."""

    simple: jax.Array
    trace_cov: jax.Array
    grad_sq_norm: jax.Array
    mean_grad_sq_norm: jax.Array
    num_examples: int


class GradientSNR(NamedTuple):
    """per_parameter: pytree like params of E[g_j]²/Var[g_j] (0 where Var = 0);
    mean: its average over parameters with non-zero variance."""

    per_parameter: Any
    mean: jax.Array


class MinibatchVariance(NamedTuple):
    """batch_sizes `(k,)`; measured: E‖g_B − Ḡ‖² over sampled batches, `(k,)`;
    std_error: its standard error; predicted: tr(Σ)/B · (1 − B/N), the variance of a
    mean of B examples drawn without replacement from the N."""

    batch_sizes: jax.Array
    measured: jax.Array
    std_error: jax.Array
    predicted: jax.Array


def _check(loss_fn, params, batch, chunk_size):
    if not callable(loss_fn):
        raise ValueError("`loss_fn` must be callable `loss_fn(params, batch)`.")
    n = _validate.num_examples(batch)
    if chunk_size is not None:
        _validate.positive_int(chunk_size, "chunk_size")
    if not jax.tree.leaves(params):
        raise ValueError("`params` has no array leaves.")
    return n


@functools.partial(jax.jit, static_argnames=("loss_fn", "chunk_size"))
def _moments(loss_fn, params, batch, *, chunk_size):
    """Mean gradient and mean elementwise squared per-example gradient."""
    grad = jax.grad(loss_fn)

    def per_chunk(b, i):
        g = jax.vmap(lambda ex: grad(params, jax.tree.map(lambda x: x[None], ex)))(b)
        return jax.tree.map(lambda x: x.mean(0), g), jax.tree.map(lambda x: (x**2).mean(0), g)

    return chunk_mean(per_chunk, batch, chunk_size)


def _noise(mean, sq, n):
    mean_sq = optax.tree.vdot(mean, mean)
    # Σ_i ‖g_i − Ḡ‖² / (N − 1) = N/(N − 1) · (mean_i ‖g_i‖² − ‖Ḡ‖²)
    trace_cov = (optax.tree.sum(sq) - mean_sq) * n / (n - 1)
    return trace_cov, mean_sq


def gradient_noise_scale(loss_fn: LossFn, params: Any, batch: Any, *,
                         chunk_size: int | None = None) -> NoiseScale:
    """The simple gradient noise scale B_simple = tr(Σ) / ‖G‖² (McCandlish et al. 2018).

    Σ is the covariance of per-example gradients over `batch` and G the expected
    gradient. Both are estimated without bias from the N examples' gradients:
    tr(Σ) with N − 1 in the denominator, and ‖G‖² as ‖Ḡ‖² − tr(Σ)/N, since the mean
    gradient's squared norm overestimates ‖G‖² by tr(Σ)/N. When noise swamps the
    signal the latter can be ≤ 0 and B_simple is then not meaningful (use more data).

    `loss_fn(params, batch)` is called on one-example batches under `vmap`.

    Example:
      >>> ns = ls.gradient_noise_scale(loss_fn, params, (x, y), chunk_size=256)
      >>> ns.simple   # critical batch size, roughly
    """
    n = _check(loss_fn, params, batch, chunk_size)
    if n < 2:
        raise ValueError("`batch` needs at least 2 examples to estimate gradient noise.")
    mean, sq = _moments(loss_fn, params, batch, chunk_size=chunk_size)
    trace_cov, mean_sq = _noise(mean, sq, n)
    grad_sq = mean_sq - trace_cov / n
    _validate.check_finite("The per-example gradients", trace_cov, mean_sq)
    return NoiseScale(trace_cov / grad_sq, trace_cov, grad_sq, mean_sq, n)


def gradient_snr(loss_fn: LossFn, params: Any, batch: Any, *,
                 chunk_size: int | None = None) -> GradientSNR:
    """Per-parameter gradient signal-to-noise ratio E[g_j]² / Var[g_j] over examples.

    Liu et al. 2020 relate a large GSNR during training to a small generalization gap.
    The variance is unbiased (N − 1 in the denominator); parameters whose gradient does
    not vary get 0 and are left out of `mean`.

    Example:
      >>> snr = ls.gradient_snr(loss_fn, params, (x, y))
      >>> snr.mean, snr.per_parameter["layers"][0]["kernel"]
    """
    n = _check(loss_fn, params, batch, chunk_size)
    if n < 2:
        raise ValueError("`batch` needs at least 2 examples to estimate gradient noise.")
    mean, sq = _moments(loss_fn, params, batch, chunk_size=chunk_size)
    var = jax.tree.map(lambda m, s: jnp.maximum(s - m**2, 0.0) * n / (n - 1), mean, sq)
    snr = jax.tree.map(lambda m, v: jnp.where(v > 0, m**2 / jnp.where(v > 0, v, 1.0), 0.0),
                       mean, var)
    counted = sum(jnp.sum(v > 0) for v in jax.tree.leaves(var))
    total = optax.tree.sum(snr)
    _validate.check_finite("The per-example gradients", total)
    return GradientSNR(snr, total / jnp.maximum(counted, 1))


@functools.partial(jax.jit, static_argnames=("loss_fn", "size", "num_batches",
                                             "chunk_size"))
def _sampled(loss_fn, params, batch, full_grad, key, *, size, num_batches, chunk_size):
    n = jax.tree.leaves(batch)[0].shape[0]

    def one(k):
        idx = jax.random.choice(k, n, (size,), replace=False)
        sub = jax.tree.map(lambda x: x[idx], batch)
        g = chunk_mean(lambda b, i: jax.grad(loss_fn)(params, b), sub, chunk_size)
        return optax.tree.norm(optax.tree.sub(g, full_grad), squared=True)

    return jax.lax.map(one, jax.random.split(key, num_batches))


def minibatch_variance(loss_fn: LossFn, params: Any, batch: Any,
                       batch_sizes: Sequence[int], *, key: jax.Array,
                       num_batches: int = 32,
                       chunk_size: int | None = None) -> MinibatchVariance:
    """Variance E‖g_B − Ḡ‖² of mini-batch gradients for each batch size B.

    `num_batches` batches of each size are drawn without replacement from `batch`
    (the population, whose mean gradient is Ḡ); the measured variance is set beside
    the prediction tr(Σ)/B · (1 − B/N) from per-example gradients. The two agree when
    examples are exchangeable; a measured curve above the prediction points at
    correlated examples. Each batch size is its own compilation.

    Example:
      >>> mv = ls.minibatch_variance(loss_fn, params, (x, y), [8, 32, 128],
      ...                            key=jax.random.key(0))
      >>> mv.measured, mv.predicted
    """
    n = _check(loss_fn, params, batch, chunk_size)
    if n < 2:
        raise ValueError("`batch` needs at least 2 examples to estimate gradient noise.")
    sizes = [int(b) for b in batch_sizes] if not isinstance(batch_sizes, int) else None
    if not sizes or any(b < 1 or b > n for b in sizes) or any(
            isinstance(b, bool) for b in batch_sizes):
        raise ValueError(f"`batch_sizes` must be a non-empty list of integers in "
                         f"[1, {n}]; got {batch_sizes!r}.")
    num_batches = _validate.positive_int(num_batches, "num_batches")
    mean, sq = _moments(loss_fn, params, batch, chunk_size=chunk_size)
    trace_cov, _ = _noise(mean, sq, n)
    measured, errors = [], []
    for i, b in enumerate(sizes):
        d = _sampled(loss_fn, params, batch, mean, jax.random.fold_in(key, i), size=b,
                     num_batches=num_batches, chunk_size=chunk_size)
        measured.append(d.mean())
        errors.append(d.std(ddof=1) / jnp.sqrt(num_batches) if num_batches > 1
                      else jnp.nan)
    bs = jnp.asarray(sizes)
    predicted = trace_cov / bs * (1.0 - bs / n)
    return MinibatchVariance(bs, jnp.stack(measured), jnp.stack(errors), predicted)
