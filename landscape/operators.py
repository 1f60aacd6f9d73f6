"""Curvature operators over parameter pytrees: Hessian, Gauss-Newton and Fisher.

An operator is a small immutable object holding the point (`params`), the data
(`batch`) and the function; it is a JAX pytree whose array leaves are `params`,
`batch` and `key`, and whose static part is the user's function and settings. It can
therefore be passed into `jax.jit`-ed code, and one compiled spectrum routine serves
every parameter value.

All operators are the curvature of the *mean* loss over the examples in `batch` and
are averaged exactly over fixed-size chunks when `chunk_size` is set, so a whole
training set fits in the memory of one chunk.

Cost of one `matvec` (P parameters, N examples): Hessian ≈ 2 gradients
(forward-over-reverse); GGN and Fisher ≈ one forward-mode and one reverse-mode pass of
`apply_fn`. None of them forms per-example gradients or a (batch × classes × classes)
tensor.

Applied many times at one point (Lanczos, traces, densities), an operator is first
passed through `prepared`: one `jax.linearize` stores what the products share, and
each product then runs only its tangent part, when that fits a memory budget.

When `batch` is split over devices along its example axis (`ls.shard_batch`, or
`ls.shard(op)`), each device averages its own examples and the shares are added with
one `psum` per matvec (`landscape.sharding`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from landscape import _bytes, _validate, losses, sharding
from landscape.chunking import chunk_mean

Loss = str | Callable[[Any, Any], jax.Array]
_LOSSES = ("cross_entropy", "mse")


class _OperatorMethods:
    """`matmat`, `dense` and size helpers shared by every operator."""

    params: Any

    def matvec(self, v: Any) -> Any:  # pragma: no cover - overridden
        raise NotImplementedError

    def __call__(self, v: Any) -> Any:
        return self.matvec(v)

    @property
    def size(self) -> int:
        """Number of parameters: the operator is `size × size`."""
        return sum(int(jnp.size(x)) for x in jax.tree.leaves(self.params))

    @property
    def dtype(self):
        return jnp.result_type(*jax.tree.leaves(self.params))

    def matmat(self, vs: Any) -> Any:
        """`matvec` of each slice of `vs` (a pytree like params with a leading axis)."""
        leaves = jax.tree.leaves(vs)
        if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
            raise ValueError("`vs` must be a pytree like params with a leading axis.")
        _validate.same_structure(jax.tree.map(lambda x: x[0], vs), self.params,
                                 name="vs[i]")
        return jax.vmap(self.matvec)(vs)

    def value(self) -> jax.Array:
        """The loss at the operator's point (0 for operators without one)."""
        return jnp.zeros(())

    def gradient(self) -> Any:
        """The loss gradient at the operator's point (None for operators without a loss)."""
        return None

    @property
    def sharded(self) -> bool:
        """Whether the parameters are placed over a mesh (`ls.shard(op, mesh=...)`)."""
        return False

    def flat_matvec(self) -> tuple[Callable[[jax.Array], jax.Array], jax.Array]:
        """`(mv, x0)`: the operator on flat vectors, and params flattened."""
        flat, unravel = ravel_pytree(self.params)

        def mv(x):
            return ravel_pytree(self.matvec(unravel(x)))[0]

        return mv, flat

    def dense(self) -> jax.Array:
        """The operator as a `(size, size)` matrix, one matvec per column: tiny models only."""
        mv, flat = self.flat_matvec()
        return jax.lax.map(mv, jnp.eye(flat.shape[0], dtype=flat.dtype)).T


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("params",), meta_fields=("fn",))
@dataclasses.dataclass(frozen=True)
class LinearOperator(_OperatorMethods):
    """A user-supplied symmetric operator `fn(v) -> v` on pytrees shaped like `params`.

    Everything in `landscape` that takes an operator accepts one of these.

    Example:
      >>> A = jnp.diag(jnp.arange(1.0, 6.0))
      >>> op = LinearOperator(lambda v: A @ v, jnp.zeros(5))
      >>> ls.eigenvalues(op, k=2, key=jax.random.key(0)).values   # [5., 4.]
    """

    fn: Callable[[Any], Any]
    params: Any

    def matvec(self, v: Any) -> Any:
        _validate.same_structure(v, self.params)
        return self.fn(v)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("params", "batch", "key"),
                   meta_fields=("kind", "fn", "loss", "chunk_size", "num_samples",
                                "shards", "layout"))
@dataclasses.dataclass(frozen=True)
class CurvatureOperator(_OperatorMethods):
    """Hessian, GGN or Fisher of a mean loss at `params` on `batch`.

    Build one with `hessian`, `ggn` or `fisher` rather than directly. `shards` is
    `(mesh, axes)` when the examples are split over devices (see `landscape.sharding`).
    """

    kind: str  # "hessian" | "ggn" | "fisher_empirical" | "fisher_true"
    fn: Callable  # loss_fn for the Hessian, apply_fn otherwise
    loss: Loss
    chunk_size: int | None
    num_samples: int
    params: Any
    batch: Any
    key: jax.Array | None = None
    shards: Any = None
    layout: Any = None  # `sharding.Layout` when the parameters are sharded over a mesh

    @property
    def sharded(self) -> bool:
        return self.layout is not None

    @property
    def num_examples(self) -> int:
        return _validate.num_examples(self.batch)

    def matvec(self, v: Any) -> Any:
        """The operator applied to `v`, a pytree with the structure of `params`."""
        _validate.same_structure(v, self.params)
        v = jax.tree.map(lambda a, p: jnp.asarray(a, jnp.result_type(p)), v, self.params)
        return self._mean(lambda op, chunk, i, v: op._chunk_matvec(chunk, i, v), v)

    def value(self) -> jax.Array:
        """The mean loss over `batch` at `params`, computed chunk by chunk."""
        return self._mean(lambda op, chunk, i: op._chunk_value(chunk))

    def gradient(self) -> Any:
        """The gradient of the mean loss at `params` (a pytree like them), chunk by chunk.

        `eigenvalues` starts its Lanczos runs from it (see there): the top of a
        network's Hessian holds most of the gradient (Gur-Ari et al. 2018).
        """
        return self._mean(lambda op, chunk, i: jax.grad(
            lambda p: dataclasses.replace(op, params=p)._chunk_value(chunk))(op.params))

    def _mean(self, fn: Callable, *args: Any) -> Any:
        """Exact mean over the examples of `fn(op, chunk, index, *args)`, split over the
        devices in `shards` when there are any."""
        if self.layout is not None:
            return chunk_mean(lambda chunk, i: fn(self, chunk, i, *args), self.batch,
                              self.chunk_size, place=self.layout.place_chunk)
        if self.shards is None:
            return chunk_mean(lambda chunk, i: fn(self, chunk, i, *args), self.batch,
                              self.chunk_size)
        rest = dataclasses.replace(self, batch=None)
        return sharding.sharded_mean(lambda a, chunk, i: fn(a[0], chunk, i, *a[1]),
                                     (rest, args), self.batch, self.chunk_size, self.shards)

    def _chunk_value(self, chunk: Any) -> jax.Array:
        if self.kind == "hessian":
            return self.fn(self.params, chunk)
        inputs, targets = chunk
        outputs = self.fn(self.params, inputs)
        if self.loss == "cross_entropy":
            return losses.cross_entropy(outputs, targets)
        if self.loss == "mse":
            return losses.mse(outputs, targets)
        return jnp.mean(jax.vmap(self.loss)(outputs, targets))

    def _chunk_matvec(self, chunk: Any, index: jax.Array, v: Any) -> Any:
        if self.kind == "hessian":
            grad = jax.grad(self.fn)
            return jax.jvp(lambda p: grad(p, chunk), (self.params,), (v,))[1]

        inputs, targets = chunk
        outputs, pullback = jax.vjp(lambda p: self.fn(p, inputs), self.params)
        jv = jax.jvp(lambda p: self.fn(p, inputs), (self.params,), (v,))[1]
        n = jax.tree.leaves(outputs)[0].shape[0]
        cotangent = self._cotangent(outputs, targets, jv, index)
        (out,) = pullback(jax.tree.map(lambda c: c / n, cotangent))
        return out

    def _cotangent(self, outputs: Any, targets: Any, jv: Any, index: jax.Array) -> Any:
        """The output-space factor `H_out (J v)` (GGN) or `g (gᵀ J v)` (Fisher) of each
        example of one chunk, before the pullback `Jᵀ`."""
        if self.kind == "ggn":
            return _output_hvp(self.loss, outputs, targets, jv)
        if self.kind == "fisher_empirical":
            return _outer_product_term(_output_grad(self.loss, outputs, targets), jv)
        # fisher_true: gradients at labels sampled from the model
        keys = jax.random.split(jax.random.fold_in(self.key, index), self.num_samples)

        def one(k):
            sampled = _sample_targets(self.loss, outputs, k)
            return _outer_product_term(_output_grad(self.loss, outputs, sampled), jv)

        return jax.tree.map(lambda c: c.mean(0), jax.vmap(one)(keys))

    def prepare(self, mode: str = "auto", budget: int | None = None):
        """This operator with products that reuse one linearization; see `prepared`."""
        return prepared(self, mode=mode, budget=budget)


# ---------------------------------------------------------------- output space ---

def _rows_per_example(z: jax.Array) -> int:
    """Positions averaged inside one example (axes between the first and the last)."""
    return 1 if z.ndim <= 2 else math.prod(z.shape[1:-1])


def _output_hvp(loss: Loss, z: Any, y: Any, u: Any) -> Any:
    """Per-example output-space Hessian of the loss times `u` (same shape as `z`)."""
    if loss == "mse":
        return u / _rows_per_example(z)
    if loss == "cross_entropy":
        p = jax.nn.softmax(z, axis=-1)
        pu = p * u
        return (pu - p * pu.sum(-1, keepdims=True)) / _rows_per_example(z)

    def one(zi, yi, ui):
        return jax.jvp(jax.grad(lambda zz: loss(zz, yi)), (zi,), (ui,))[1]

    return jax.vmap(one)(z, y, u)


def _output_grad(loss: Loss, z: Any, y: Any) -> Any:
    """Per-example gradient of the loss with respect to that example's outputs."""
    if loss == "mse":
        return (z - y) / _rows_per_example(z)
    if loss == "cross_entropy":
        p = jax.nn.softmax(z, axis=-1)
        onehot = (jax.nn.one_hot(y, z.shape[-1], dtype=z.dtype)
                  if jnp.issubdtype(y.dtype, jnp.integer) else y)
        return (p - onehot) / _rows_per_example(z)
    return jax.vmap(jax.grad(loss))(z, y)


def _sample_targets(loss: Loss, z: jax.Array, key: jax.Array) -> jax.Array:
    """Targets drawn from the model's predictive distribution at outputs `z`."""
    if loss == "cross_entropy":
        return jax.random.categorical(key, z, axis=-1)
    return z + jax.random.normal(key, z.shape, z.dtype)  # mse: N(z, I)


def _outer_product_term(g: Any, jv: Any) -> Any:
    """Cotangent `(g_i · (Jv)_i) g_i` for each example i: the rank-one Fisher term."""
    dots = sum(jnp.sum((a * b).reshape(a.shape[0], -1), axis=1)
               for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(jv)))
    return jax.tree.map(lambda a: dots.reshape((-1,) + (1,) * (a.ndim - 1)) * a, g)


# ------------------------------------------------------- prepared products ---

MODES = ("auto", "linearize", "plain")


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("base", "linear", "outputs"), meta_fields=())
@dataclasses.dataclass(frozen=True)
class PreparedOperator(_OperatorMethods):
    """`base` whose products replay one stored linearization (build with `prepared`).

    `linear` is the `jax.linearize` tangent map (a `jax.tree_util.Partial` whose leaves
    are the stored residuals): of the gradient for the Hessian, of the model's outputs
    over every example for the GGN and Fisher. `outputs` holds the linearized map's
    value: the gradient (Hessian), the model's outputs (GGN, Fisher). Meant to
    live inside one jitted routine: build it there, apply it many times, let it go.
    """

    base: CurvatureOperator
    linear: Any
    outputs: Any = None

    @property
    def params(self) -> Any:
        return self.base.params

    @property
    def num_examples(self) -> int:
        return self.base.num_examples

    def value(self) -> jax.Array:
        return self.base.value()

    @property
    def sharded(self) -> bool:
        return self.base.sharded

    def gradient(self) -> Any:
        """The loss gradient: for the Hessian, the linearization's own output (no cost)."""
        return self.outputs if self.base.kind == "hessian" else self.base.gradient()

    def matvec(self, v: Any) -> Any:
        _validate.same_structure(v, self.params)
        v = jax.tree.map(lambda a, p: jnp.asarray(a, jnp.result_type(p)), v, self.params)
        if self.base.kind == "hessian":
            return self.linear(v)
        op = self.base
        jv = self.linear(v)
        cot = _chunk_map(lambda a, i: op._cotangent(*a, i), (self.outputs, op.batch[1], jv),
                         op.chunk_size)
        n = op.num_examples
        (out,) = jax.linear_transpose(self.linear, op.params)(
            jax.tree.map(lambda c: c / n, cot))
        return out


def _chunk_map(fn: Callable[[Any, jax.Array], Any], batch: Any,
               chunk_size: int | None) -> Any:
    """`fn(chunk, index)` on the chunks `chunk_mean` would use, results concatenated
    along the example axis (so a chunk sees exactly the examples it sees there)."""
    n = _validate.num_examples(batch)
    if chunk_size is None or chunk_size >= n:
        return fn(batch, jnp.asarray(0))
    num_full, rem = divmod(n, chunk_size)
    full = jax.tree.map(lambda x: x[: num_full * chunk_size].reshape(
        (num_full, chunk_size) + x.shape[1:]), batch)
    out = jax.lax.map(lambda a: fn(*a), (full, jnp.arange(num_full)))
    out = jax.tree.map(lambda x: x.reshape((num_full * chunk_size,) + x.shape[2:]), out)
    if rem:
        tail = fn(jax.tree.map(lambda x: x[num_full * chunk_size:], batch),
                  jnp.asarray(num_full))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
    return out


def _linearize(op: CurvatureOperator) -> tuple[Any, Any]:
    """`(outputs, linear)`: the linearization `prepared` stores for `op`."""
    if op.kind == "hessian":
        def grad(p):
            at = dataclasses.replace(op, params=p)
            return at._mean(lambda o, chunk, i: jax.grad(o.fn)(o.params, chunk))

        return jax.linearize(grad, op.params)
    inputs = op.batch[0]
    return jax.linearize(
        lambda p: _chunk_map(lambda x, i: op.fn(p, x), inputs, op.chunk_size), op.params)


def prepared(op, mode: str = "auto", budget: int | None = None):
    """`op` with cheaper products when it is applied many times at one point.

    A Hessian-vector product by forward-over-reverse recomputes the gradient (a forward
    and a backward pass) before its tangent; a GGN or Fisher product recomputes the
    model's forward pass twice. `jax.linearize` does that once and stores what the
    tangent needs (the residuals: activations and the derivatives of the layers), so
    each later product runs only the tangent: about one gradient's work less per product.
    Lanczos, Hutchinson/Hutch++ traces, diagonals, spectral densities and per-block runs
    apply one operator tens to hundreds of times, so they call this once, inside their
    jitted routine, before their loop of products. Chunked operators store every
    chunk's residuals (so the memory of the chunk bound is given up: the budget decides).

    Args:
      op: any operator of `landscape`. A `hessian`, `ggn` or `fisher` is linearized; a
        wrapper with an `op` field (`ls.restrict`'s block) has its inner operator
        prepared; anything else (a `LinearOperator`) is returned as it is.
      mode: `"auto"` linearizes when the residuals fit `budget`, `"linearize"` always,
        `"plain"` never (returns `op`).
      budget: bytes the stored residuals may take (counted from their shapes, by tracing
        only); default `ls.memory.default_budget()`, a quarter of the device's memory.
        Operators whose examples are split over devices stay plain in `"auto"`.

    Returns:
      An operator with the same `.matvec` / `.matmat` / `.value()` contract, whose
      products equal `op`'s to rounding.

    Example:
      >>> @jax.jit
      ... def rayleigh_quotients(H, vs):
      ...     H = ls.operators.prepared(H)            # one linearization ...
      ...     return jax.lax.map(lambda v: optax.tree.vdot(v, H.matvec(v)), vs)  # ... reused
    """
    _validate.choice(mode, "mode", MODES)
    if mode == "plain" or isinstance(op, PreparedOperator):
        return op
    if not isinstance(op, CurvatureOperator):
        if dataclasses.is_dataclass(op) and "op" in {f.name for f in dataclasses.fields(op)}:
            return dataclasses.replace(op, op=prepared(op.op, mode, budget))
        return op
    if op.shards is not None:
        if mode == "linearize":
            raise ValueError("mode='linearize' is not available for an operator whose "
                             "examples are split over devices; use 'auto' or 'plain'.")
        return op
    if mode == "auto":
        limit = _bytes.default_budget() if budget is None else budget
        if product_bytes(op) > limit:
            return op
    outputs, linear = _linearize(op)
    return PreparedOperator(op, linear, outputs)


def product_bytes(op) -> int:
    """Bytes the linearization of `op` stores (`prepared`), counted from shapes by
    tracing only: about what one product's tangents carry through the model, so also
    the memory each extra probe of a block costs. A `LinearOperator` counts its vector.

    Example:
      >>> ls.operators.product_bytes(H) / 2**20   # MiB
    """
    if isinstance(op, PreparedOperator):
        op = op.base
    if isinstance(op, CurvatureOperator):
        if op.shards is not None:  # stays plain (`prepared`): its tangents, per device
            return _bytes.tree_bytes(jax.eval_shape(lambda o: _linearize(
                dataclasses.replace(o, shards=None))[1], op)) // op.shards[0].size
        return _bytes.tree_bytes(jax.eval_shape(lambda o: _linearize(o)[1], op))
    if dataclasses.is_dataclass(op) and "op" in {f.name for f in dataclasses.fields(op)}:
        return product_bytes(op.op)
    return _bytes.tree_bytes(op.params)


# ------------------------------------------------------------------ builders ---

def _check_floating(params: Any) -> None:
    """Curvature is a derivative in the parameters: an integer leaf has none (JAX would
    give its tangent the `float0` type and fail deep inside a product)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    if not leaves:
        raise ValueError("`params` has no array leaves.")
    bad = [jax.tree_util.keystr(path) or "params" for path, x in leaves
           if not jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if bad:
        raise ValueError("curvature needs floating-point parameters; `params` has "
                         f"non-floating leaves at {', '.join(bad[:5])}. Keep integer "
                         "state (step counters, indices) out of the differentiated "
                         "parameters.")


def _check_chunk(batch: Any, chunk_size: int | None) -> int:
    n = _validate.num_examples(batch)
    if chunk_size is not None:
        _validate.positive_int(chunk_size, "chunk_size")
    return n


def _first_chunk(batch: Any, chunk_size: int | None) -> Any:
    c = _validate.num_examples(batch) if chunk_size is None else chunk_size
    return jax.tree.map(lambda x: x[:c], batch)


def _check_pair(batch: Any) -> None:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("`batch` must be a pair `(inputs, targets)` for output-space "
                         f"curvature (ggn, fisher); got {type(batch).__name__}.")


def _check_loss(loss: Loss, allow_callable: bool = True) -> None:
    if callable(loss):
        if not allow_callable:
            raise ValueError("The true Fisher samples targets from the model, which "
                             "needs `loss` in ('cross_entropy', 'mse'); got a callable.")
        return
    _validate.choice(loss, "loss", _LOSSES)


def _build(kind, fn, loss, chunk_size, num_samples, params, batch, key=None):
    """The operator; when `batch` is split over devices, the rest joins it there."""
    shards = sharding.batch_shards(batch)
    if shards is not None:
        batch = sharding.place_batch(batch, shards)
        params, key = sharding.replicate(params, shards), sharding.replicate(key, shards)
    return CurvatureOperator(kind, fn, loss, chunk_size, num_samples, params, batch, key,
                             shards)


def hessian(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any, *,
            chunk_size: int | None = None) -> CurvatureOperator:
    """The Hessian of the mean loss `loss_fn(params, batch)` as an operator.

    Hessian-vector products are forward-over-reverse (`jax.jvp` of `jax.grad`), about
    twice the cost of a gradient.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss over `batch`.
      params: the point, any pytree of arrays.
      batch: pytree whose leaves share a leading example axis (may be a whole dataset).
      chunk_size: evaluate this many examples at a time and average exactly.

    Example:
      >>> H = ls.hessian(loss_fn, params, (x, y), chunk_size=512)
      >>> Hv = H.matvec(v)
      >>> ls.eigenvalues(H, k=5, key=jax.random.key(0)).values
    """
    _check_floating(params)
    _check_chunk(batch, chunk_size)
    out = jax.eval_shape(loss_fn, params, _first_chunk(batch, chunk_size))
    if not hasattr(out, "shape") or out.shape != ():
        raise ValueError("`loss_fn` must return a scalar (the mean loss over the batch); "
                         f"it returned {getattr(out, 'shape', type(out).__name__)}.")
    return _build("hessian", loss_fn, "none", chunk_size, 1, params, batch)


def ggn(apply_fn: Callable[[Any, Any], Any], params: Any, batch: Any, *,
        loss: Loss = "cross_entropy", chunk_size: int | None = None) -> CurvatureOperator:
    """The generalized Gauss-Newton `(1/N) Σ_i J_iᵀ H_i J_i` as an operator.

    `J_i` is the Jacobian of `apply_fn(params, inputs_i)` and `H_i` the Hessian of the
    loss in output space, in closed form for `"cross_entropy"` (diag(p) − p pᵀ) and
    `"mse"` (identity, for ½‖z − y‖²); a callable `loss(outputs_i, targets_i) -> scalar`
    (one example) gets its output Hessian by automatic differentiation. The losses match
    `landscape.losses.cross_entropy` and `landscape.losses.mse`.

    Args:
      apply_fn: `apply_fn(params, inputs) -> outputs` (classes on the last axis).
      params: the point.
      batch: the pair `(inputs, targets)`, leading example axis on every leaf.
      loss: `"cross_entropy"`, `"mse"` or a per-example callable.
      chunk_size: examples per chunk.

    Example:
      >>> G = ls.ggn(model_apply, params, (x, y), loss="cross_entropy")
      >>> ls.trace(G, key=jax.random.key(0)).value
    """
    _check_floating(params)
    _check_pair(batch)
    _check_loss(loss)
    _check_chunk(batch, chunk_size)
    return _build("ggn", apply_fn, loss, chunk_size, 1, params, tuple(batch))


def fisher(apply_fn: Callable[[Any, Any], Any], params: Any, batch: Any, *,
           kind: str = "true", key: jax.Array | None = None,
           loss: Loss = "cross_entropy", num_samples: int = 1,
           chunk_size: int | None = None) -> CurvatureOperator:
    """The Fisher information `(1/N) Σ_i g_i g_iᵀ` of per-example gradients as an operator.

    - `kind="empirical"`: `g_i` is the gradient of example i's loss at its true target.
    - `kind="true"`: `g_i` is the gradient at targets sampled from the model's own
      predictive distribution (categorical for cross-entropy, N(outputs, I) for mse),
      `num_samples` per example, drawn once per chunk from `key`, so the operator is a
      fixed matrix. Its expectation over the samples is the GGN.

    The matvec never forms per-example parameter gradients: `g_iᵀ v` is an output-space
    dot product with `J_i v`, and the sum over examples is one vector-Jacobian product.

    Example:
      >>> F = ls.fisher(model_apply, params, (x, y), kind="true", key=jax.random.key(1))
      >>> ls.eigenvalues(F, k=3, key=jax.random.key(2)).values
    """
    _check_floating(params)
    _validate.choice(kind, "kind", ("true", "empirical"))
    _check_pair(batch)
    _check_loss(loss, allow_callable=(kind == "empirical"))
    _check_chunk(batch, chunk_size)
    _validate.positive_int(num_samples, "num_samples")
    if kind == "true" and key is None:
        raise ValueError("`key` is required for the true Fisher (kind='true'): targets "
                         "are sampled from the model with it.")
    return _build(f"fisher_{kind}", apply_fn, loss, chunk_size, num_samples, params,
                  tuple(batch), key if kind == "true" else None)


def per_example_grads(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                      *, chunk_size: int | None = None) -> Any:
    """Gradients of `loss_fn` on each example alone: a pytree like params with a leading N.

    `loss_fn(params, batch)` is called on one-example batches under `vmap`;
    `chunk_size` vmaps that many at a time (memory is N × P either way for the output).

    Example:
      >>> g = ls.per_example_grads(loss_fn, params, (x, y))   # leaves: (N, *shape)
    """
    _check_chunk(batch, chunk_size)
    grad = jax.grad(loss_fn)

    def one(example):
        return grad(params, jax.tree.map(lambda x: x[None], example))

    return jax.lax.map(one, batch, batch_size=chunk_size or _validate.num_examples(batch))
