"""Critical points of a loss: where the gradient vanishes, minima and saddles alike.

A critical point is a zero of the gradient map g(θ) = ∇L(θ). Minimizing ½‖g‖² (whose
gradient is H g, one Hessian-vector product) is drawn to every zero of g, saddles
included, which is what a study of saddles needs and what gradient descent on L itself
avoids (Dauphin et al. 2014, "Identifying and attacking the saddle point problem";
Pennington & Bahri 2017, "Geometry of neural network loss surfaces via random matrix
theory"). It is also drawn to points where H g = 0 but g ≠ 0 (Frye et al. 2019,
"Numerically recovering the critical points of a deep linear autoencoder" call them
gradient-flat), so every point found carries its gradient norm and a `converged` flag,
and only points whose gradient norm fell below `tol` count as critical.

Methods (all jit-compiled, one search per start):
- `"gauss_newton"` (default): Levenberg-Marquardt on the gradient map. Each step solves
  (H² + λI) δ = −H g by `cg_steps` conjugate-gradient iterations (2 HVPs each), takes
  δ if it lowers ‖g‖ (then λ shrinks) and refuses it otherwise (then λ grows). Near a
  non-degenerate critical point of any index it converges quadratically.
- `"gd"`: gradient descent on ½‖g‖², θ ← θ − η H g (one HVP per step).
- `"adam"`: Adam (optax) on ½‖g‖² with learning rate η.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from landscape import _validate
from landscape.chunking import chunk_mean
from landscape.index import HessianIndex, hessian_index
from landscape.operators import hessian, prepared

METHODS = ("gauss_newton", "gd", "adam")
INDEX = ("auto", "dense", "density", "none")
DENSE_LIMIT = 3000  # parameters up to which index="auto" takes every eigenvalue


class CriticalPoint(NamedTuple):
    """A point reached by the search and what it is. From `critical_points` every field
    has a leading axis over the starts.

    `converged` is `grad_norm <= tol`: only those points are critical points; the others
    are where the step budget ran out. `index` is None when not asked for."""

    params: Any
    loss: jax.Array
    grad_norm: jax.Array
    converged: jax.Array
    steps: jax.Array
    index: HessianIndex | None


def _norm(tree) -> jax.Array:
    return optax.tree.norm(tree)


def _search(loss_fn, params, batch, key, *, steps, tol, method, learning_rate, cg_steps,
            damping, index, index_tol, index_rtol, num_probes, num_lanczos, chunk_size):
    def grad(p):
        return chunk_mean(lambda c, i: jax.grad(loss_fn)(p, c), batch, chunk_size)

    def hvp(p, v):
        return hessian(loss_fn, p, batch, chunk_size=chunk_size).matvec(v)

    g0 = grad(params)
    n0 = _norm(g0)
    hg0 = hvp(params, g0)
    # λ starts at `damping` times a Rayleigh estimate of H²'s scale along g.
    lam0 = damping * optax.tree.vdot(hg0, hg0) / jnp.maximum(n0 ** 2, 1e-30)
    opt = optax.adam(learning_rate) if method == "adam" else None

    def cond(state):
        return (state["t"] < steps) & (state["gnorm"] > tol)

    def body(state):
        p, g = state["p"], state["g"]
        if method == "gauss_newton":
            lam = state["lam"]
            # 2 * cg_steps + 1 products at one point: linearize once (`prepared`).
            H = prepared(hessian(loss_fn, p, batch, chunk_size=chunk_size))
            rhs = jax.tree.map(jnp.negative, H.matvec(g))
            mat = lambda v: optax.tree.add_scale(H.matvec(H.matvec(v)), lam, v)
            delta, _ = jax.scipy.sparse.linalg.cg(mat, rhs, tol=0.0, atol=0.0,
                                                  maxiter=cg_steps)
            trial = optax.tree.add(p, delta)
            g_trial = grad(trial)
            n_trial = _norm(g_trial)
            better = n_trial < state["gnorm"]
            pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(better, x, y), a, b)
            return dict(state, p=pick(trial, p), g=pick(g_trial, g),
                        gnorm=jnp.where(better, n_trial, state["gnorm"]),
                        lam=jnp.where(better, jnp.maximum(lam / 3.0, 1e-30), lam * 4.0),
                        t=state["t"] + 1)
        direction = hvp(p, g)  # ∇ ½‖g‖²
        if method == "gd":
            new_p = optax.tree.add_scale(p, -learning_rate, direction)
            opt_state = state["opt"]
        else:
            updates, opt_state = opt.update(direction, state["opt"], p)
            new_p = optax.apply_updates(p, updates)
        new_g = grad(new_p)
        return dict(state, p=new_p, g=new_g, gnorm=_norm(new_g), opt=opt_state,
                    t=state["t"] + 1)

    init = dict(p=params, g=g0, gnorm=n0, lam=lam0.astype(n0.dtype), t=jnp.asarray(0),
                opt=opt.init(params) if opt is not None else ())
    out = jax.lax.while_loop(cond, body, init)
    p = out["p"]
    loss = chunk_mean(lambda c, i: loss_fn(p, c), batch, chunk_size)
    idx = None
    if index != "none":
        op = hessian(loss_fn, p, batch, chunk_size=chunk_size)
        idx = hessian_index(op, method=index, key=key, tol=index_tol, rtol=index_rtol,
                            num_probes=num_probes, num_steps=num_lanczos)
        # A diverged search has no index: 0 would read like a minimum.
        finite = jnp.isfinite(loss) & jnp.isfinite(out["gnorm"]) & jnp.all(jnp.asarray(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(p)]))
        idx = jax.tree.map(lambda f: jnp.where(finite, f, jnp.nan), idx)
    return CriticalPoint(p, loss, out["gnorm"], out["gnorm"] <= tol, out["t"], idx)


_STATIC = ("loss_fn", "steps", "method", "cg_steps", "index", "index_tol", "index_rtol",
           "num_probes", "num_lanczos", "chunk_size", "batch_size")


def _points(loss_fn, starts, batch, keys, *, batch_size, **kw):
    fn = lambda sk: _search(loss_fn, sk[0], batch, sk[1], **kw)
    return jax.lax.map(fn, (starts, keys), batch_size=batch_size)


_points_jit = jax.jit(_points, static_argnames=_STATIC)


def _check(loss_fn, starts, batch, steps, tol, method, learning_rate, cg_steps, damping,
           index, key, num_starts=None):
    if not callable(loss_fn):
        raise ValueError(f"`loss_fn` must be callable loss_fn(params, batch); got "
                         f"{type(loss_fn).__name__}.")
    _validate.positive_int(steps, "steps")
    _validate.positive_int(cg_steps, "cg_steps")
    _validate.choice(method, "method", METHODS)
    _validate.choice(index, "index", INDEX)
    for name, value in (("tol", tol), ("learning_rate", learning_rate),
                        ("damping", damping)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"`{name}` must be a number > 0; got {value!r}.")
    _validate.num_examples(batch)
    leaves = jax.tree.leaves(starts)
    if not leaves or not all(jnp.issubdtype(jnp.result_type(x), jnp.floating)
                             for x in leaves):
        raise ValueError("`starts` must be a non-empty pytree of floating-point arrays.")
    if num_starts is not None:
        sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes or 0 in sizes:
            raise ValueError("Every leaf of `starts` needs the same leading axis (one "
                             f"entry per start); got leading sizes {sorted(map(str, sizes))}.")
    if index == "density" and key is None:
        raise ValueError("`key` is required for index='density' (and for index='auto' "
                         f"above {DENSE_LIMIT} parameters).")
    _validate.check_finite("`starts`", starts)


def critical_points(loss_fn: Callable[[Any, Any], jax.Array], starts: Any, batch: Any, *,
                    steps: int = 100, tol: float = 1e-6, method: str = "gauss_newton",
                    learning_rate: float = 0.1, cg_steps: int = 20, damping: float = 1e-3,
                    index: str = "auto", key: jax.Array | None = None,
                    index_tol: float | None = None, index_rtol: float = 1e-3,
                    num_probes: int = 10, num_lanczos: int = 80,
                    chunk_size: int | None = None,
                    batch_size: int | None = None) -> CriticalPoint:
    """Search for a critical point of the mean loss from each of several starts.

    Minimizes ½‖∇L‖² (gradient H∇L) from every start for at most `steps` steps, stopping
    once ‖∇L‖ <= `tol` (see the module docstring for the methods and their cost), then
    reports each point's loss, gradient norm, `converged` flag and Hessian index.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, the mean loss.
      starts: a parameter pytree with a leading axis over the starts.
      batch: the examples (pytree with a leading example axis), used whole (in chunks of
        `chunk_size`) for every gradient and Hessian-vector product.
      steps, tol: the step budget and the gradient-norm threshold (absolute).
      method: "gauss_newton", "gd" or "adam"; `learning_rate` is η for the last two,
        `cg_steps` and `damping` (initial λ relative to ‖Hg‖²/‖g‖²) belong to the first.
      index: "dense" (every eigenvalue, exact; small models), "density" (stochastic
        Lanczos quadrature, needs `key`), "auto" (dense up to 3000 parameters) or "none".
        `index_tol`, `index_rtol`, `num_probes`, `num_lanczos` go to `ls.hessian_index`.
      batch_size: starts searched together under `vmap` (None: one after another, which
        is faster on CPU).

    Returns:
      `CriticalPoint` with a leading axis over the starts. Points with `converged` False
      are not critical points: report them as such.

    Example:
      >>> starts = jax.tree.map(lambda *xs: jnp.stack(xs), *checkpoints)
      >>> cp = ls.critical_points(loss_fn, starts, batch, steps=200, tol=1e-5)
      >>> cp.loss[cp.converged], cp.index.negative[cp.converged]
    """
    _check(loss_fn, starts, batch, steps, tol, method, learning_rate, cg_steps, damping,
           index, None if index != "density" else key, num_starts=True)
    n = jax.tree.leaves(starts)[0].shape[0]
    size = sum(int(np.prod(np.shape(x)[1:])) for x in jax.tree.leaves(starts))
    if index == "auto":
        index = "dense" if size <= DENSE_LIMIT else "density"
        if index == "density" and key is None:
            _check(loss_fn, starts, batch, steps, tol, method, learning_rate, cg_steps,
                   damping, index, key)
    keys = jax.random.split(key if key is not None else jax.random.key(0), n)
    if batch_size is not None:
        batch_size = _validate.positive_int(batch_size, "batch_size")
    return _points_jit(loss_fn, starts, batch, keys, steps=steps, tol=tol, method=method,
                       learning_rate=learning_rate, cg_steps=cg_steps, damping=damping,
                       index=index, index_tol=index_tol, index_rtol=index_rtol,
                       num_probes=num_probes, num_lanczos=num_lanczos,
                       chunk_size=chunk_size, batch_size=batch_size)


def find_critical_point(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batch: Any,
                        **kwargs) -> CriticalPoint:
    """`critical_points` from the single start `params` (same keywords); fields carry no
    leading axis.

    Example:
      >>> cp = ls.find_critical_point(loss_fn, params, batch, tol=1e-6, index="dense")
      >>> bool(cp.converged), float(cp.index.negative)
    """
    if not jax.tree.leaves(params):
        raise ValueError("`params` has no leaves.")
    starts = jax.tree.map(lambda x: jnp.asarray(x)[None], params)
    out = critical_points(loss_fn, starts, batch, **kwargs)
    return jax.tree.map(lambda x: x[0], out)
