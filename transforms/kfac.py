"""K-FAC: Kronecker-factored natural gradient for dense layers, as an optax transform.

Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature".

For a dense layer s = a W + b (input a, pre-activation s), the Fisher block of the
per-example gradient vec(ã gᵀ) (ã = [a, 1] when the layer has a bias, g = ∂loss/∂s) is
approximated by A ⊗ G with A = E[ã ãᵀ] and G = E[g gᵀ], g taken at labels sampled from
the model (the true Fisher). The natural-gradient step for that layer is then
(A + π√λ I)⁻¹ [∇W; ∇b] (G + √λ/π I)⁻¹ (factored Tikhonov damping, π² = (tr A / dim A)
/ (tr G / dim G)), or (A ⊗ G + λ I)⁻¹ vec[∇W; ∇b] exactly, both from eigendecompositions
of A and G.

Design: how the statistics reach the transform
---------------------------------------------
optax transformations see only gradients, so the factors come in through an extra
argument of `update` (a `GradientTransformationExtraArgs`):

    stats = kfac_statistics(apply_fn, params, x, key=key)
    updates, state = opt.update(grads, state, params, statistics=stats)

`kfac_statistics` needs no registration of layers and knows nothing of the model's
library. It traces `apply_fn(params, inputs)` to a jaxpr (inlining inner `jit`s) and
calls a dense layer any `dot_general` of an activation (contracted on its last axis)
with a rank-2 parameter leaf (`x @ W`, `x @ W.T`, `nnx.Linear`, `linen.Dense`), plus the
rank-1 parameter leaf added to its output, if any (the bias). It then re-evaluates the
jaxpr with a zero "perturbation" array added to each layer's pre-activation and records
each layer's input; the vector-Jacobian product of the outputs with respect to the
perturbations, at the gradient of the loss for sampled labels, is exactly the
per-example cotangents g of the pre-activations. One forward pass and `num_samples`
backward passes through the network give every layer's A and G. `find_dense_layers`
returns the same layer list, which `kfac` needs to size its state.

A Flax NNX model is used as users write it:

    graphdef, params = nnx.split(model, nnx.Param)
    apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)

Parameters that belong to no dense layer (normalization scales, embeddings, shared
kernels) pass their gradient through unchanged: chain another transform for them with
`optax.partition` if needed.

Cost per step for a layer with n_in inputs and n_out outputs, batch N: statistics
O(N (n_in² + n_out²)) time and one forward plus `num_samples` backward passes; memory
O(n_in² + n_out²) for the factors and as much again for their inverses; the
preconditioned gradient O(n_in n_out (n_in + n_out)); and every `inverse_every` steps
two symmetric eigendecompositions, O(n_in³ + n_out³).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from transforms import _second_order_blocks as blocks
from transforms import _second_order_tagging as tagging
from transforms import _second_order_validate as check
from transforms._second_order_tagging import DenseLayer

__all__ = ["DenseLayer", "KFACState", "KFACStatistics", "find_dense_layers", "kfac",
           "kfac_statistics", "scale_by_kfac"]

_LOSSES = ("cross_entropy", "mse")


class KFACStatistics(NamedTuple):
    """One batch's Kronecker factors, one entry per dense layer (in `find_dense_layers`
    order): `activations[l]` = E[ã ãᵀ] (ã with a trailing 1 when the layer has a bias),
    `gradients[l]` = E[g gᵀ] of the pre-activation gradients."""

    activations: tuple
    gradients: tuple


class KFACState(NamedTuple):
    """State of `scale_by_kfac`: running factors, the eigendecompositions taken at the
    last refresh (vectors as columns, values clipped at 0), and momentum."""

    count: jax.Array
    activations: tuple
    gradients: tuple
    activation_eigvecs: tuple
    activation_eigvals: tuple
    gradient_eigvecs: tuple
    gradient_eigvals: tuple
    momentum: Any       # pytree like params, or () without momentum


def find_dense_layers(apply_fn: Callable, params: Any, inputs: Any
                      ) -> tuple[DenseLayer, ...]:
    """The dense layers of `apply_fn(params, inputs)` (see the module docstring).

    Only shapes matter: `inputs` may be a single example's worth of the real batch.

    Example:
      >>> layers = find_dense_layers(apply_fn, params, x[:1])
      >>> [layer.name for layer in layers]
    """
    layers = tagging.trace(apply_fn, params, inputs).layers
    if not layers:
        raise ValueError("`apply_fn` has no dense layer that K-FAC can see: expected a "
                         "`dot_general` of an activation with a rank-2 leaf of `params` "
                         "(x @ W, nnx.Linear, linen.Dense).")
    return layers


def _sample_output_grad(loss: str, outputs: jax.Array, key: jax.Array) -> jax.Array:
    """∂loss/∂outputs per example at targets drawn from the model's own prediction."""
    if loss == "cross_entropy":
        y = jax.random.categorical(key, outputs, axis=-1)
        return jax.nn.softmax(outputs, axis=-1) - jax.nn.one_hot(y, outputs.shape[-1],
                                                                 dtype=outputs.dtype)
    return -jax.random.normal(key, outputs.shape, outputs.dtype)  # y ~ N(z, I): z − y


def _given_output_grad(loss: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    if loss == "cross_entropy":
        onehot = (jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
                  if jnp.issubdtype(targets.dtype, jnp.integer) else targets)
        return jax.nn.softmax(outputs, axis=-1) - onehot
    return outputs - targets


def kfac_statistics(apply_fn: Callable, params: Any, inputs: Any, *,
                    key: jax.Array | None = None, loss: str = "cross_entropy",
                    num_samples: int = 1, targets: jax.Array | None = None
                    ) -> KFACStatistics:
    """K-FAC's factors A = E[ã ãᵀ] and G = E[g gᵀ] for every dense layer of `apply_fn`.

    Labels are drawn from the model (`jax.random.categorical` of the logits for
    `"cross_entropy"`, N(outputs, I) for `"mse"`, `num_samples` draws from
    `jax.random.split(key, num_samples)`): the true Fisher. Given `targets`, the
    gradients are taken at those labels instead (the empirical Fisher).
    Activations with extra axes (positions) count as more rows: A averages over all
    rows, G sums over positions and averages over examples.

    Args:
      apply_fn: `apply_fn(params, inputs) -> outputs` (one array, classes last).
      params: pytree of parameters.
      inputs: the batch's inputs (leading example axis).
      key: PRNG key for the sampled labels (required unless `targets` is given).
      loss: "cross_entropy" (softmax over the last axis) or "mse" (½‖z − y‖²).
      num_samples: labels drawn per example (>= 1).
      targets: labels for the empirical Fisher instead of sampled ones.

    Example:
      >>> stats = kfac_statistics(apply_fn, params, x, key=jax.random.key(0))
      >>> updates, state = opt.update(grads, state, params, statistics=stats)
    """
    check.choice(loss, "loss", _LOSSES)
    num_samples = check.positive_int(num_samples, "num_samples")
    if targets is None and key is None:
        raise ValueError("`key` is required to sample labels from the model (or pass "
                         "`targets` for the empirical Fisher).")
    graph = tagging.trace(apply_fn, params, inputs)
    if not graph.layers:
        find_dense_layers(apply_fn, params, inputs)  # raises the explanatory error
    outputs, pullback, acts = jax.vjp(
        lambda pert: tagging.run_tapped(graph, params, inputs, pert),
        tagging.zeros_for(graph), has_aux=True)
    if not isinstance(outputs, jax.Array):
        raise ValueError("`apply_fn` must return a single array of outputs for K-FAC; "
                         f"got {type(outputs).__name__}.")
    n = outputs.shape[0]
    if targets is not None:
        cts = _given_output_grad(loss, outputs, targets)[None]
    else:
        keys = jax.random.split(key, num_samples)
        cts = jax.vmap(lambda k: _sample_output_grad(loss, outputs, k))(keys)
    gs = jax.lax.map(lambda c: pullback(c)[0], cts)      # per layer: (S, N, ..., out)
    a_list, g_list = [], []
    for layer, a, g in zip(graph.layers, acts, gs):
        a = a.reshape(-1, a.shape[-1])
        if layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
        g = g.reshape(-1, g.shape[-1])
        a_list.append(a.T @ a / a.shape[0])
        g_list.append(g.T @ g / (n * cts.shape[0]))
    return KFACStatistics(tuple(a_list), tuple(g_list))


def _eig_or_previous(factor, vecs, vals):
    """Eigen-decomposition of a symmetric factor; the previous one if it is not finite."""
    sym = 0.5 * (factor + factor.T)
    ok = jnp.all(jnp.isfinite(sym))
    w, v = blocks._eigh(jnp.where(ok, sym, jnp.eye(sym.shape[0], dtype=sym.dtype)))
    ok = ok & jnp.all(jnp.isfinite(w)) & jnp.all(jnp.isfinite(v))
    return jnp.where(ok, v, vecs), jnp.where(ok, jnp.maximum(w, 0.0), vals)


def _factor_sizes(layer: DenseLayer) -> tuple[int, int]:
    return layer.fan_in + (layer.bias is not None), layer.fan_out


def _check_layers(layers) -> tuple[DenseLayer, ...]:
    if not isinstance(layers, (tuple, list)) or not layers or not all(
            isinstance(layer, DenseLayer) for layer in layers):
        raise ValueError("`layers` must be a non-empty sequence of DenseLayer, as "
                         "returned by `find_dense_layers(apply_fn, params, inputs)`.")
    return tuple(layers)


def scale_by_kfac(
    layers,
    *,
    damping: float = 1e-3,
    decay: float = 0.95,
    inverse_every: int = 10,
    momentum: float = 0.0,
    tikhonov: str = "factored",
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradients of dense layers by K-FAC (no learning rate).

    `update(grads, state, params=None, *, statistics)` takes a `KFACStatistics` from
    `kfac_statistics` for this step's batch. The running factors are
    A ← (1 − w) A + w A_batch with w = max(1 − decay, 1/(t + 1)) (a plain average until
    the exponential one takes over). Every `inverse_every` steps, from the first, both
    factors are eigendecomposed, A = U diag(α) Uᵀ and G = V diag(γ) Vᵀ (a failed
    decomposition keeps the previous one), and the direction for a layer with gradient
    X = [∇W; ∇bᵀ] is U [(Uᵀ X V) ⊘ D] Vᵀ with

    - `tikhonov="factored"` (Martens & Grosse §6.3): D = (α + π√λ)(γ + √λ/π)ᵀ, i.e.
      (A + π√λ I)⁻¹ X (G + √λ/π I)⁻¹, with π² = (tr A / dim A) / (tr G / dim G);
    - `tikhonov="exact"`: D = α γᵀ + λ, i.e. (A ⊗ G + λ I)⁻¹ vec X exactly.

    Then heavy-ball momentum m ← momentum · m + direction if `momentum` > 0. Leaves
    outside every layer pass through unchanged.

    Args:
      layers: `find_dense_layers(apply_fn, params, inputs)`.
      damping: Tikhonov damping λ > 0.
      decay: factor decay in [0, 1).
      inverse_every: steps between eigendecompositions (>= 1).
      momentum: heavy-ball coefficient in [0, 1).
      tikhonov: "factored" or "exact".

    Cost per step: see the module docstring.

    Example:
      >>> layers = find_dense_layers(apply_fn, params, x)
      >>> opt = optax.chain(scale_by_kfac(layers), optax.scale_by_learning_rate(0.1))
      >>> stats = kfac_statistics(apply_fn, params, x, key=key)
      >>> updates, state = opt.update(grads, state, params, statistics=stats)
    """
    layers = _check_layers(layers)
    damping = check.positive(damping, "damping")
    decay = check.decay(decay, "decay")
    inverse_every = check.positive_int(inverse_every, "inverse_every")
    momentum = check.decay(momentum, "momentum")
    tikhonov = check.choice(tikhonov, "tikhonov", ("factored", "exact"))
    sizes = [_factor_sizes(layer) for layer in layers]

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        for layer in layers:
            if layer.kernel >= len(leaves) or jnp.shape(leaves[layer.kernel]) != (
                    (layer.fan_out, layer.fan_in) if layer.transposed
                    else (layer.fan_in, layer.fan_out)):
                raise ValueError(f"`layers` do not match `params`: no kernel of the "
                                 f"expected shape for layer {layer.name}.")
        dtype = leaves[layers[0].kernel].dtype
        zeros = lambda d: jnp.zeros((d, d), dtype)  # noqa: E731
        eye = lambda d: jnp.eye(d, dtype=dtype)  # noqa: E731
        ones = lambda d: jnp.ones((d,), dtype)  # noqa: E731
        return KFACState(
            jnp.zeros([], jnp.int32),
            tuple(zeros(a) for a, _ in sizes), tuple(zeros(g) for _, g in sizes),
            tuple(eye(a) for a, _ in sizes), tuple(ones(a) for a, _ in sizes),
            tuple(eye(g) for _, g in sizes), tuple(ones(g) for _, g in sizes),
            optax.tree.zeros_like(params) if momentum > 0 else ())

    def _check_stats(statistics):
        if not isinstance(statistics, KFACStatistics):
            raise ValueError("`statistics` must be the KFACStatistics of this batch, "
                             "from `kfac_statistics(apply_fn, params, inputs, key=...)`.")
        if len(statistics.activations) != len(layers) or any(
                jnp.shape(a) != (da, da) or jnp.shape(g) != (dg, dg)
                for a, g, (da, dg) in zip(statistics.activations, statistics.gradients,
                                          sizes)):
            raise ValueError("`statistics` do not match `layers`: compute both from the "
                             "same apply_fn and parameters.")

    def scale(alpha, gamma):
        if tikhonov == "exact":
            return 1.0 / (alpha[:, None] * gamma[None, :] + damping)
        ta, tg = jnp.mean(alpha), jnp.mean(gamma)
        pi = jnp.sqrt(jnp.where((ta > 0) & (tg > 0), ta / jnp.where(tg > 0, tg, 1.0), 1.0))
        root = jnp.sqrt(damping)
        return 1.0 / ((alpha + pi * root)[:, None] * (gamma + root / pi)[None, :])

    def update_fn(updates, state, params=None, *, statistics=None, **extra_args):
        del params, extra_args
        _check_stats(statistics)
        count = state.count
        w = jnp.maximum(1.0 - decay, 1.0 / (count + 1))  # default float dtype
        # the state keeps the parameters' dtype whatever the inputs' dtype
        acts = tuple((1 - w).astype(a.dtype) * a + w.astype(a.dtype) * b.astype(a.dtype)
                     for a, b in zip(state.activations, statistics.activations))
        grads = tuple((1 - w).astype(g.dtype) * g + w.astype(g.dtype) * b.astype(g.dtype)
                      for g, b in zip(state.gradients, statistics.gradients))

        def refresh(acts, grads, eig):
            ua, aa, ug, ag = eig
            ea = [_eig_or_previous(f, v, e) for f, v, e in zip(acts, ua, aa)]
            eg = [_eig_or_previous(f, v, e) for f, v, e in zip(grads, ug, ag)]
            return (tuple(v for v, _ in ea), tuple(e for _, e in ea),
                    tuple(v for v, _ in eg), tuple(e for _, e in eg))

        eig = (state.activation_eigvecs, state.activation_eigvals,
               state.gradient_eigvecs, state.gradient_eigvals)
        eig = jax.lax.cond(count % inverse_every == 0, refresh, lambda a, g, e: e,
                           acts, grads, eig)

        leaves, treedef = jax.tree.flatten(updates)
        out = list(leaves)
        for layer, ua, aa, ug, ag in zip(layers, *eig):
            x = leaves[layer.kernel]
            x = x.T if layer.transposed else x
            if layer.bias is not None:
                x = jnp.concatenate([x, leaves[layer.bias][None, :]], axis=0)
            d = ua @ ((ua.T @ x @ ug) * scale(aa, ag).astype(x.dtype)) @ ug.T
            if layer.bias is not None:
                out[layer.bias] = d[-1]
                d = d[:-1]
            out[layer.kernel] = d.T if layer.transposed else d
        direction = treedef.unflatten(out)
        mom = state.momentum
        if momentum > 0:
            mom = jax.tree.map(lambda m, d: momentum * m + d, state.momentum, direction)
            direction = mom
        new_state = KFACState(optax.safe_increment(count), acts, grads, *eig, mom)
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    layers,
    *,
    damping: float = 1e-3,
    decay: float = 0.95,
    inverse_every: int = 10,
    momentum: float = 0.0,
    tikhonov: str = "factored",
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with a learning rate: `scale_by_kfac` followed by a descent step.

    Example:
      >>> layers = find_dense_layers(apply_fn, params, x)
      >>> opt = kfac(learning_rate=0.1, layers=layers, damping=1e-3)
      >>> state = opt.init(params)
      >>> stats = kfac_statistics(apply_fn, params, x, key=key)
      >>> updates, state = opt.update(grads, state, params, statistics=stats)
    """
    return optax.chain(
        scale_by_kfac(layers, damping=damping, decay=decay, inverse_every=inverse_every,
                      momentum=momentum, tikhonov=tikhonov),
        optax.scale_by_learning_rate(learning_rate))
