"""K-FAC: Kronecker-factored natural gradient for dense and convolution layers, as an
optax transform.

Martens & Grosse (2015), "Optimizing Neural Networks with Kronecker-factored Approximate
Curvature"; convolutions as in Grosse & Martens (2016), "A Kronecker-factored
approximate Fisher matrix for convolution layers" (KFC).

For a dense layer s = a W + b (input a, pre-activation s), the Fisher block of the
per-example gradient vec(ã gᵀ) (ã = [a, 1] when the layer has a bias, g = ∂loss/∂s) is
approximated by A ⊗ G with A = E[ã ãᵀ] and G = E[g gᵀ], g taken at labels sampled from
the model (the true Fisher). The natural-gradient step for that layer is then
(A + π√λ I)⁻¹ [∇W; ∇b] (G + √λ/π I)⁻¹ (factored Tikhonov damping, π² = (tr A / dim A)
/ (tr G / dim G); the two inverses by Cholesky), or (A ⊗ G + λ I)⁻¹ vec[∇W; ∇b]
exactly (from eigendecompositions of A and G).

A convolution is the same dense layer applied at every output position to the input
patch under its kernel (KFC): ã is a patch (input channels × kernel offsets, plus 1),
W the kernel reshaped to (patch size, output channels), and positions count as extra
examples: A = E over examples and positions of ã ãᵀ, G = E over examples of
Σ_positions g gᵀ (KFC's Ω ⊗ Γ with the factor |T| moved from Ω to Γ; the product,
and so the step, is the same), under KFC's assumptions of spatially uncorrelated,
homogeneous derivatives.

Design: how the statistics reach the transform
---------------------------------------------
optax transformations see only gradients, so the factors come in through an extra
argument of `update` (a `GradientTransformationExtraArgs`):

    stats = kfac_statistics(apply_fn, params, x, key=key)
    updates, state = opt.update(grads, state, params, statistics=stats)

`kfac_statistics` needs no registration of layers and knows nothing of the model's
library. It traces `apply_fn(params, inputs)` to a jaxpr (inlining inner `jit`s) and
calls a dense layer any `dot_general` of an activation (contracted on its last axis)
with a rank-2 parameter leaf (`x @ W`, `x @ W.T`, `nnx.Linear`, `linen.Dense`), and a
convolution layer any `conv_general_dilated` with a parameter kernel (`nnx.Conv`,
`linen.Conv`, `lax.conv_general_dilated`, any layout, stride, padding, dilation; not
grouped), plus the rank-1 parameter leaf added to its output, if any (the bias). It then re-evaluates the
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

Cost per step for a layer with n_in inputs and n_out outputs, batch N (N × positions
rows for a convolution): statistics O(N (n_in² + n_out²)) time and one forward plus
`num_samples` backward passes (XLA shares the forward with the gradient's when both are
in one jitted step); memory O(n_in² + n_out²) for the factors and as much again for
their inverses; the preconditioned gradient two products, O(n_in n_out (n_in + n_out));
and every `inverse_every` steps two Cholesky inverses, O(n_in³ + n_out³) (two
eigendecompositions with `tikhonov="exact"`, several times dearer on CPU).

Where the time goes (40-256-256-10, batch 512, float32; XLA's cost analysis): the
gradient is 232 MFLOP; the statistics add 341 (their outer products ã ãᵀ and g gᵀ
271, the backward pass to the pre-activations the rest), the preconditioning 135, the
refresh about 10 per step amortized over 10 steps: 3.1× a gradient's FLOPs, and
statistics on every step on the whole batch are the bulk.

Groups: inside `jax.vmap` over members pass the global step unbatched
(`train_step(..., step=t)`); the refresh then stays one `lax.cond` for the group.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import _validate as check

from transforms import _second_order_blocks as blocks
from transforms import _second_order_tagging as tagging
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
    """State of `scale_by_kfac`: running factors, what the last refresh computed from
    them, momentum, and counters.

    With `tikhonov="factored"` the refresh stores the damped inverses
    (A + π√λ I)⁻¹ and (G + √λ/π I)⁻¹ (`*_inverses`; the `*_eig*` fields are empty);
    with `tikhonov="exact"` it stores the eigendecompositions (vectors as columns,
    values clipped at 0; the `*_inverses` fields are empty). `refreshes` counts the
    refreshes taken so far."""

    count: jax.Array
    refreshes: jax.Array
    activations: tuple
    gradients: tuple
    activation_inverses: tuple
    gradient_inverses: tuple
    activation_eigvecs: tuple
    activation_eigvals: tuple
    gradient_eigvecs: tuple
    gradient_eigvals: tuple
    momentum: Any       # pytree like params, or () without momentum


def find_dense_layers(apply_fn: Callable, params: Any, inputs: Any
                      ) -> tuple[DenseLayer, ...]:
    """The dense and convolution layers of `apply_fn(params, inputs)` (see the module
    docstring); convolutions have `kernel_axes` set.

    Only shapes matter: `inputs` may be a single example's worth of the real batch.

    Example:
      >>> layers = find_dense_layers(apply_fn, params, x[:1])
      >>> [layer.name for layer in layers]
    """
    layers = tagging.trace(apply_fn, params, inputs).layers
    if not layers:
        raise ValueError("`apply_fn` has no dense layer that K-FAC can see: expected a "
                         "`dot_general` of an activation with a rank-2 leaf of `params` "
                         "(x @ W, nnx.Linear, linen.Dense) or a convolution with a "
                         "parameter kernel (nnx.Conv, lax.conv_general_dilated).")
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
      >>> opt = kfac(learning_rate=0.1, layers=find_dense_layers(apply_fn, params, x))
      >>> state = opt.init(params)
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
    if cts.shape[0] == 1:   # a direct call: a one-trip loop would block XLA's fusions
        gs = tuple(g[None] for g in pullback(cts[0])[0])
    else:                   # one sample at a time keeps memory at one backward pass
        gs = jax.lax.map(lambda c: pullback(c)[0], cts)  # per layer: (S, N, ..., out)
    a_list, g_list = [], []
    for k, (layer, a, g) in enumerate(zip(graph.layers, acts, gs)):
        a = tagging.layer_rows(graph, k, a)
        if layer.bias is not None:
            a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
        g = tagging.output_rows(graph, k, g)
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


def _inverse_or_previous(factor, shift, previous):
    """(factor + shift I)⁻¹; `previous` if the factor or its inverse is not finite."""
    ok = jnp.all(jnp.isfinite(factor))
    inv = blocks.damped_inverse(jnp.where(ok, factor, jnp.eye(factor.shape[0],
                                                             dtype=factor.dtype)), shift)
    ok = ok & jnp.all(jnp.isfinite(inv))
    return jnp.where(ok, inv, previous)


def _pi(a, g):
    """π of the factored damping: √((tr A / dim A) / (tr G / dim G)), 1 if either is 0."""
    ta, tg = jnp.trace(a) / a.shape[0], jnp.trace(g) / g.shape[0]
    good = (ta > 0) & (tg > 0)
    return jnp.sqrt(jnp.where(good, ta / jnp.where(good, tg, 1.0), 1.0))


def _factored_refresh(acts, grads, state, damping):
    """Both inverses of every layer, the Cholesky factorizations one after another."""
    root = jnp.sqrt(damping)
    inv_a, inv_g, token = [], [], None
    for a, g, pa, pg in zip(acts, grads, state.activation_inverses,
                            state.gradient_inverses):
        pi = _pi(a, g)
        inv_a.append(_inverse_or_previous(blocks.after(a, token),
                                          (pi * root).astype(a.dtype), pa))
        inv_g.append(_inverse_or_previous(blocks.after(g, inv_a[-1]),
                                          (root / pi).astype(g.dtype), pg))
        token = inv_g[-1]
    return tuple(inv_a), tuple(inv_g)


def _exact_refresh(acts, grads, state):
    ea, eg, token = [], [], None
    for f, v, e in zip(acts, state.activation_eigvecs, state.activation_eigvals):
        ea.append(_eig_or_previous(blocks.after(f, token), v, e))
        token = ea[-1][0]
    for f, v, e in zip(grads, state.gradient_eigvecs, state.gradient_eigvals):
        eg.append(_eig_or_previous(blocks.after(f, token), v, e))
        token = eg[-1][0]
    return (tuple(v for v, _ in ea), tuple(e for _, e in ea),
            tuple(v for v, _ in eg), tuple(e for _, e in eg))


def _refresh(state, acts, grads, damping, tikhonov):
    """The state with its inverses (or eigendecompositions) recomputed from the factors."""
    if tikhonov == "factored":
        inv_a, inv_g = _factored_refresh(acts, grads, state, damping)
        state = state._replace(activation_inverses=inv_a, gradient_inverses=inv_g)
    else:
        ua, aa, ug, ag = _exact_refresh(acts, grads, state)
        state = state._replace(activation_eigvecs=ua, activation_eigvals=aa,
                               gradient_eigvecs=ug, gradient_eigvals=ag)
    return state._replace(refreshes=state.refreshes + 1)


def _layer_direction(state, index, x, damping, tikhonov):
    """The preconditioned (fan_in [+1], fan_out) gradient matrix of layer `index`."""
    if tikhonov == "factored":
        inv_a = state.activation_inverses[index].astype(x.dtype)
        inv_g = state.gradient_inverses[index].astype(x.dtype)
        return inv_a @ x @ inv_g
    ua, aa = state.activation_eigvecs[index], state.activation_eigvals[index]
    ug, ag = state.gradient_eigvecs[index], state.gradient_eigvals[index]
    scale = 1.0 / (aa[:, None] * ag[None, :] + damping)
    return ua @ ((ua.T @ x @ ug) * scale.astype(x.dtype)) @ ug.T


def _precondition(layers, updates, state, damping, tikhonov):
    leaves, treedef = jax.tree.flatten(updates)
    out = list(leaves)
    for index, layer in enumerate(layers):
        x = tagging.kernel_matrix(layer, leaves[layer.kernel])
        if layer.bias is not None:
            x = jnp.concatenate([x, leaves[layer.bias][None, :]], axis=0)
        d = _layer_direction(state, index, x, damping, tikhonov)
        if layer.bias is not None:
            out[layer.bias] = d[-1]
            d = d[:-1]
        out[layer.kernel] = tagging.kernel_from_matrix(layer, d, leaves[layer.kernel].shape)
    return treedef.unflatten(out)


def _factor_sizes(layer: DenseLayer) -> tuple[int, int]:
    return layer.fan_in + (layer.bias is not None), layer.fan_out


def _check_layers(layers) -> tuple[DenseLayer, ...]:
    if not isinstance(layers, (tuple, list)) or not layers or not all(
            isinstance(layer, DenseLayer) for layer in layers):
        raise ValueError("`layers` must be a non-empty sequence of DenseLayer, as "
                         "returned by `find_dense_layers(apply_fn, params, inputs)`.")
    return tuple(layers)


def _check_kernels(layers, leaves):
    for layer in layers:
        if layer.kernel >= len(leaves):
            ok = False
        elif layer.kernel_axes is not None:
            shape = jnp.shape(leaves[layer.kernel])
            ok = len(shape) == len(layer.kernel_axes) and \
                shape[layer.kernel_axes[-1]] == layer.fan_out and \
                int(np.prod(shape)) == layer.fan_in * layer.fan_out
        else:
            ok = jnp.shape(leaves[layer.kernel]) == (
                (layer.fan_out, layer.fan_in) if layer.transposed
                else (layer.fan_in, layer.fan_out))
        if not ok:
            raise ValueError(f"`layers` do not match `params`: no kernel of the "
                             f"expected shape for layer {layer.name}.")


def _check_stats(statistics, layers, sizes):
    if not isinstance(statistics, KFACStatistics):
        raise ValueError("`statistics` must be the KFACStatistics of this batch, "
                         "from `kfac_statistics(apply_fn, params, inputs, key=...)`.")
    if len(statistics.activations) != len(layers) or any(
            jnp.shape(a) != (da, da) or jnp.shape(g) != (dg, dg)
            for a, g, (da, dg) in zip(statistics.activations, statistics.gradients,
                                      sizes)):
        raise ValueError("`statistics` do not match `layers`: compute both from the "
                         "same apply_fn and parameters.")


def _check_step(step):
    if step is None:
        return None
    if isinstance(step, bool) or jnp.ndim(step) != 0 or not jnp.issubdtype(
            jnp.result_type(step), jnp.integer):
        raise ValueError(f"`step` must be an integer scalar (the global step count); "
                         f"got {step!r}.")
    return step


def _running(old, new, w):
    # the state keeps the parameters' dtype whatever the inputs' dtype
    return tuple((1 - w).astype(a.dtype) * a + w.astype(a.dtype) * b.astype(a.dtype)
                 for a, b in zip(old, new))


def _has_momentum(momentum) -> bool:
    # A literal 0 keeps no momentum buffer; a traced coefficient (swept) needs one.
    return not (isinstance(momentum, (int, float)) and momentum == 0)


def scale_by_kfac(
    layers,
    *,
    damping: Any = 1e-3,
    decay: Any = 0.95,
    inverse_every: int = 10,
    momentum: Any = 0.0,
    tikhonov: str = "factored",
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradients of dense and convolution layers by K-FAC (no learning
    rate).

    `update(grads, state, params=None, *, statistics, step=None)` takes a
    `KFACStatistics` from `kfac_statistics` for this step's batch. The running factors
    are A ← (1 − w) A + w A_batch with w = max(1 − decay, 1/(t + 1)) (a plain average
    until the exponential one takes over). Every `inverse_every` steps, from the first,
    the factors are refreshed (a failed refresh keeps the previous one), and the
    direction for a layer with gradient X = [∇W; ∇bᵀ] is

    - `tikhonov="factored"` (Martens & Grosse §6.3): (A + π√λ I)⁻¹ X (G + √λ/π I)⁻¹,
      with π² = (tr A / dim A) / (tr G / dim G); the refresh computes both inverses by
      Cholesky (π and λ at the refresh);
    - `tikhonov="exact"`: (A ⊗ G + λ I)⁻¹ vec X exactly, from the eigendecompositions
      A = U diag(α) Uᵀ, G = V diag(γ) Vᵀ taken at the refresh: U [(Uᵀ X V) ⊘ (αγᵀ + λ)] Vᵀ.

    Then heavy-ball momentum m ← momentum · m + direction if `momentum` is not a literal
    0. Leaves outside every layer pass through unchanged. A convolution kernel is
    preconditioned as its (patch, output channel) matrix (KFC, Grosse & Martens 2016).

    The refresh is a `lax.cond` on `step % inverse_every == 0`, `step` the extra
    argument when given (the global step count, e.g. from `train_step(..., step=t)`)
    and the state's own count otherwise. Inside `jax.vmap` over members, pass `step`
    unbatched (`in_axes=None`): the condition then stays a real branch and the group
    refreshes once per period; with the state's count (batched) vmap turns the cond
    into a select that refreshes at every step (correct, slower).

    `damping`, `decay` and `momentum` may be traced (swept under `jax.vmap`).

    Args:
      layers: `find_dense_layers(apply_fn, params, inputs)`.
      damping: Tikhonov damping λ > 0.
      decay: factor decay in [0, 1).
      inverse_every: steps between refreshes (>= 1).
      momentum: heavy-ball coefficient in [0, 1).
      tikhonov: "factored" or "exact".

    Cost per step: see the module docstring.

    Example:
      >>> layers = find_dense_layers(apply_fn, params, x)
      >>> opt = optax.chain(scale_by_kfac(layers), optax.scale_by_learning_rate(0.1))
      >>> stats = kfac_statistics(apply_fn, params, x, key=key)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state, params, statistics=stats)
    """
    layers = _check_layers(layers)
    damping = check.positive(damping, "damping")
    decay = check.unit_interval(decay, "decay")
    inverse_every = check.positive_int(inverse_every, "inverse_every")
    momentum = check.unit_interval(momentum, "momentum")
    tikhonov = check.choice(tikhonov, "tikhonov", ("factored", "exact"))
    sizes = [_factor_sizes(layer) for layer in layers]

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        _check_kernels(layers, leaves)
        dtype = leaves[layers[0].kernel].dtype
        zeros = lambda d: jnp.zeros((d, d), dtype)  # noqa: E731
        eye = lambda d: jnp.eye(d, dtype=dtype)  # noqa: E731
        ones = lambda d: jnp.ones((d,), dtype)  # noqa: E731
        # before the first refresh: unit factors, damped as a refresh would damp them
        inv = lambda d: eye(d) / (1 + jnp.sqrt(damping)).astype(dtype)  # noqa: E731
        exact = tikhonov == "exact"
        return KFACState(
            jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
            tuple(zeros(a) for a, _ in sizes), tuple(zeros(g) for _, g in sizes),
            () if exact else tuple(inv(a) for a, _ in sizes),
            () if exact else tuple(inv(g) for _, g in sizes),
            tuple(eye(a) for a, _ in sizes) if exact else (),
            tuple(ones(a) for a, _ in sizes) if exact else (),
            tuple(eye(g) for _, g in sizes) if exact else (),
            tuple(ones(g) for _, g in sizes) if exact else (),
            optax.tree.zeros_like(params) if _has_momentum(momentum) else ())

    def update_fn(updates, state, params=None, *, statistics=None, step=None,
                  **extra_args):
        del params, extra_args
        _check_stats(statistics, layers, sizes)
        step = _check_step(step)
        count = state.count
        w = jnp.maximum(1.0 - decay, 1.0 / (count + 1))  # default float dtype
        state = state._replace(activations=_running(state.activations,
                                                    statistics.activations, w),
                               gradients=_running(state.gradients, statistics.gradients, w))
        now = count if step is None else step
        state = jax.lax.cond(now % inverse_every == 0,
                             lambda s: _refresh(s, s.activations, s.gradients, damping,
                                                tikhonov),
                             lambda s: s, state)
        direction = _precondition(layers, updates, state, damping, tikhonov)
        if _has_momentum(momentum):
            mom = jax.tree.map(lambda m, d: momentum * m + d, state.momentum, direction)
            state, direction = state._replace(momentum=mom), mom
        return direction, state._replace(count=optax.safe_increment(count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    layers,
    *,
    damping: Any = 1e-3,
    decay: Any = 0.95,
    inverse_every: int = 10,
    momentum: Any = 0.0,
    tikhonov: str = "factored",
) -> optax.GradientTransformationExtraArgs:
    """K-FAC with a learning rate: `scale_by_kfac` followed by a descent step.

    Every hyper-parameter but `layers`, `inverse_every` and `tikhonov` may be traced.

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
