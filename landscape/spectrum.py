"""Eigenvalues and spectral density of any symmetric operator on parameter pytrees.

Lanczos with full re-orthogonalization runs on parameter pytrees: the basis, probes and
eigenvectors keep the parameters' leaves (and their sharding over a mesh; nothing is
flattened into one replicated vector, see `landscape._vectors`). By
default `eigenvalues` is adaptive: one `lax.while_loop` that stops when the recurrence's
residual estimates of the wanted Ritz pairs meet `tol`, followed (for k >= 2) by
deflated checks for copies of repeated eigenvalues a single Krylov space cannot hold;
a fixed `num_steps` runs the plain `lax.scan`. When the Krylov space closes (the
residual vanishes: low-rank curvature, clustered eigenvalues) Lanczos restarts from a
random vector orthogonal to the basis and records a zero coupling, so the tridiagonal
matrix stays exact instead of filling with rounding noise.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from landscape import _validate
from landscape import _vectors as V
from landscape.operators import MODES, prepared


class Eigen(NamedTuple):
    """Eigenpairs of an operator.

    values: `(k,)`, descending for `which="top"`, ascending for `"bottom"` (so
      `values[0]` is the extreme one), and `(2k,)` descending for `"both"`.
    vectors: pytree like params with a leading axis of the same length; unit norm.
    residuals: `‖A x − λ x‖` of each pair, computed with one extra matvec per pair.
    converged: `(k,)` booleans, `residuals <= tol·|values|` for the `tol` passed to
      `eigenvalues`. By Weyl's and the Kato-Temple bounds the eigenvalue error is at most
      the residual, and about residual²/gap once the pair is separated from the rest of
      the spectrum by `gap`. A relative test: an eigenvalue at exactly 0 never counts as
      converged, so read its residual.
    num_matvecs: operator products used in all (Lanczos steps plus one per pair for the
      residuals).
    checked: whether the values are safe from a missed copy of a repeated eigenvalue.
      A Krylov space from one vector holds one copy of each distinct eigenvalue, which is
      all `k=1` (per end) needs: True. For `k >= 2` it is True when a check block
      searched the complement of everything found (see `eigenvalues`) and converged
      without a value beyond the k-th; False when no check ran (fixed `num_steps`, a warm
      start, `check=False`, `method="power"`) or it did not finish within `max_steps`.
    """

    values: jax.Array
    vectors: Any
    residuals: jax.Array
    converged: jax.Array | None = None
    num_matvecs: jax.Array | None = None
    checked: jax.Array | None = None


def _info(v) -> tuple[int, Any]:
    """(dimension, dtype) of a vector pytree."""
    leaves = V.leaves(v)
    return sum(int(x.size) for x in leaves), jnp.result_type(*leaves)


def _unit(v):
    return V.scale(1.0 / V.norm(v), v)


def _restart_vector(basis, key, like, draw=None):
    r = V.orthogonalize(basis, V.normal(key, like) if draw is None else draw(key))
    dtype = _info(like)[1]
    return V.scale(1.0 / jnp.maximum(V.norm(r), jnp.finfo(dtype).tiny), r)


def lanczos(mv, v0: Any, num_steps: int, key: jax.Array, *, draw=None):
    """`num_steps` Lanczos steps from `v0` with full re-orthogonalization.

    `v0` is a flat vector or a pytree like the parameters (`mv` maps such vectors to
    such vectors). Returns `(alphas, betas, basis)`: the tridiagonal matrix's diagonal
    `(m,)`, its couplings `(m,)` (`betas[j]` couples steps j and j+1; zero marks a
    restart) and the orthonormal basis, `(m, n)` for a flat `v0` and otherwise a
    pytree like `v0` with a leading axis m. `draw(key)`: the random vector a
    breakdown restarts from (default: normal draws shaped like `v0`).
    """
    n, dtype = _info(v0)
    tol = 10.0 * jnp.sqrt(n) * jnp.finfo(dtype).eps
    basis = V.zeros(v0, num_steps)

    def step(carry, j):
        basis, q, q_prev, beta_prev, scale, key = carry
        basis = V.set_row(basis, j, q)
        w = mv(q)
        alpha = V.dot(q, w)
        w = V.orthogonalize(basis, V.axpy(-beta_prev, q_prev, V.axpy(-alpha, q, w)))
        beta = V.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        key, sub = jax.random.split(key)
        broke = beta <= tol * scale
        q_next = jax.lax.cond(broke, lambda: _restart_vector(basis, sub, v0, draw),
                              lambda: V.scale(1.0 / jnp.where(broke, 1.0, beta), w))
        beta = jnp.where(broke, 0.0, beta)
        return (basis, q_next, q, beta, scale, key), (alpha, beta)

    q0 = _unit(v0)
    zero = jnp.zeros((), dtype)
    init = (basis, q0, V.zeros(q0), zero, zero, key)
    (basis, *_), (alphas, betas) = jax.lax.scan(step, init, jnp.arange(num_steps))
    return alphas, betas, basis


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    return jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)


def _pick(values: jax.Array, k: int, which: str) -> jax.Array:
    """Indices of the wanted Ritz values in `values` (sorted ascending)."""
    m = values.shape[0]
    top = jnp.arange(m - 1, m - 1 - k, -1)
    bottom = jnp.arange(k)
    if which == "top":
        return top
    if which == "bottom":
        return bottom
    return jnp.concatenate([top, bottom[::-1]])


def _scale_rows(values, vectors):
    return jax.tree.map(lambda x: values.reshape((-1,) + (1,) * (x.ndim - 1)) * x, vectors)


def _residuals(mv, values, vectors):
    """‖A y − θ y‖ for each pair, one product each."""
    return V.row_norms(V.sub(jax.lax.map(mv, vectors), _scale_rows(values, vectors)))


_PRODUCT_BYTES = 2**28   # a stack of products that adaptive runs keep (see below)


def _keeps_products(op, cap) -> bool:
    """Whether an adaptive run stores each product A·q beside the basis, so that the
    final pairs' residuals ‖A y − θ y‖ come from products already taken (A y is their
    combination) instead of one more product per pair. Costs a second basis, so only
    when it is small (`_PRODUCT_BYTES`) and the parameters are not sharded."""
    n, dtype = _info(op.params)
    return not op.sharded and cap * n * jnp.dtype(dtype).itemsize <= _PRODUCT_BYTES


def _products(op, mode, budget):
    """The pytree matvec of `op`, prepared for many products (`ls.prepared`)."""
    return prepared(op, mode, budget).matvec


def _flat(op, mv, splits):
    """`(mv on flat leaves, to flat leaves, back to shaped leaves, draw)` for the loops
    that keep a basis (`V.flat_layout`: a leaf split over devices becomes one row per
    device, so the reshape moves no data); `splits` is `V.split_dims(op.params)`.
    `draw(key)` is a normal vector drawn in the parameters' shapes, then flattened:
    the same numbers on any mesh."""
    to_flat, to_shaped = V.flat_layout(op.params, splits)
    return ((lambda x: to_flat(mv(to_shaped(x)))), to_flat, to_shaped,
            lambda key: to_flat(V.normal(key, op.params)))


def _cold_start(op, key, which):
    """A random unit vector plus, where the top end is wanted and `op` has a loss, the
    unit loss gradient: a network's gradient lies mostly in its Hessian's (and GGN's)
    top eigenspace (Gur-Ari et al. 2018), so Lanczos starts with a large component
    there; the random half keeps every direction within a factor √2 of a random start
    (a zero gradient, at a critical point, leaves the random vector alone)."""
    v = _unit(V.normal(key, op.params))
    g = None if which == "bottom" else op.gradient()
    if g is None:
        return v
    norm = V.norm(g)
    return V.axpy(jnp.where(norm > 0, 1.0 / jnp.where(norm > 0, norm, 1.0), 0.0), g, v)


@functools.partial(jax.jit, static_argnames=("k", "which", "num_steps", "mode", "budget",
                                             "splits"))
def _lanczos_eigen(op, key, *, k, which, num_steps, mode, budget, splits):
    mv, flat, shaped, draw = _flat(op, _products(op, mode, budget), splits)
    k_start, k_restart = jax.random.split(key)
    v0 = V.normal(k_start, op.params)
    alphas, betas, basis = lanczos(mv, flat(v0), num_steps, k_restart, draw=draw)
    theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
    idx = _pick(theta, k, which)
    values = theta[idx]
    vectors = V.combine(s[:, idx], basis)
    return values, shaped(vectors), _residuals(mv, values, vectors), op.value()


# ------------------------------------------------------------ adaptive Lanczos ---

class _Ritz(NamedTuple):
    """Wanted Ritz pairs of the rows filled so far (see `_ritz`)."""

    values: jax.Array   # (wanted,)
    coeffs: jax.Array   # (cap, wanted) their eigenvectors of T, in basis coordinates
    done: jax.Array     # every wanted pair's residual estimate <= tol·|θ|


class _State(NamedTuple):
    j: jax.Array          # row of the vector `q` about to be applied
    basis: Any            # stack of cap vectors (pytrees), rows 0..j-1 filled
    alphas: jax.Array     # (cap,) diagonal of T
    couple: jax.Array     # (cap,) couple[r] links rows r and r+1 (0 at a restart)
    out: jax.Array        # (cap,) the β dropped at a breakdown restart (round-off size)
    q: Any
    q_prev: Any
    beta_prev: jax.Array
    scale: jax.Array
    done: jax.Array
    key: jax.Array
    products: Any = None  # stack of cap products A·q (rows 0..j-1), when kept


def _ritz(st: _State, beta, *, k, which, tol) -> _Ritz:
    """Wanted Ritz pairs of T on rows 0..j and the stopping test.

    Unfilled rows get a diagonal entry above the Gershgorin bound of T, so they decouple
    exactly and sort last: the first j+1 values are T's own. A pair's residual estimate
    is ‖out ⊙ s‖ with this step's `beta` at row j (β_m times the last component).
    """
    cap = st.alphas.shape[0]
    rows = jnp.arange(cap)
    real = rows <= st.j
    couple = jnp.where(rows < st.j, st.couple, 0.0)[:-1]
    bound = jnp.max(jnp.where(real, jnp.abs(st.alphas), 0.0)) + 2 * jnp.max(
        jnp.abs(st.couple)) + 2 * beta
    d = jnp.where(real, st.alphas, 4 * bound + 1)
    theta, s = jnp.linalg.eigh(jnp.diag(d) + jnp.diag(couple, 1) + jnp.diag(couple, -1))
    est = jnp.sqrt(jnp.sum((st.out.at[st.j].set(beta)[:, None] * s) ** 2, axis=0))
    top, bottom = st.j - jnp.arange(k), jnp.arange(k)
    idx = {"top": top, "bottom": bottom, "both": jnp.concatenate([top, bottom[::-1]])}[which]
    idx = jnp.clip(idx, 0, cap - 1)
    ok = est[idx] <= tol * jnp.abs(theta[idx])
    return _Ritz(theta[idx], s[:, idx], (st.j + 1 >= idx.shape[0]) & jnp.all(ok))


def _adaptive_step(mv, st: _State, *, k, which, tol, draw) -> tuple[_State, _Ritz]:
    """One Lanczos product (as `lanczos`), then the stopping test."""
    cap = st.alphas.shape[0]
    n, dtype = _info(st.q)
    j = st.j
    basis = V.set_row(st.basis, j, st.q)
    w = mv(st.q)
    if st.products is not None:
        st = st._replace(products=V.set_row(st.products, j, w))
    alpha = V.dot(st.q, w)
    w = V.reorthogonalize(basis, V.axpy(-st.beta_prev, st.q_prev, V.axpy(-alpha, st.q, w)))
    beta = V.norm(w)
    scale = jnp.maximum(st.scale, jnp.maximum(jnp.abs(alpha), beta))
    broke = beta <= 10.0 * jnp.sqrt(n) * jnp.finfo(dtype).eps * scale
    st = st._replace(basis=basis, alphas=st.alphas.at[j].set(alpha))
    ritz = _ritz(st, beta, k=k, which=which, tol=tol)
    key, sub = jax.random.split(st.key)
    q_next = jax.lax.cond(broke, lambda: _restart_vector(basis, sub, st.q, draw),
                          lambda: V.scale(1.0 / jnp.where(broke, 1.0, beta), w))
    return st._replace(
        j=j + 1, couple=st.couple.at[j].set(jnp.where(broke, 0.0, beta)),
        out=st.out.at[j].set(jnp.where(broke, beta, 0.0)), q=q_next, q_prev=st.q,
        beta_prev=jnp.where(broke, 0.0, beta), scale=scale,
        done=ritz.done | (j + 1 >= cap), key=key), ritz


def _adaptive_run(mv, v0, key, tol, *, k, which, cap, draw, keep=False):
    """Lanczos from `v0` until the wanted pairs converge or `cap` rows are filled.

    Returns `(values, vectors, steps, products)`, the wanted pairs ordered as `_pick`
    orders them; with `keep`, every product A·q is stored as it is taken and `products`
    is A applied to the vectors (their combination; otherwise None).
    """
    dtype = _info(v0)[1]
    zero, wanted = jnp.zeros((), dtype), 2 * k if which == "both" else k
    st = _State(j=jnp.zeros((), jnp.int32), basis=V.zeros(v0, cap),
                alphas=jnp.zeros((cap,), dtype), couple=jnp.zeros((cap,), dtype),
                out=jnp.zeros((cap,), dtype), q=_unit(v0),
                q_prev=V.zeros(v0), beta_prev=zero, scale=zero,
                done=jnp.zeros((), bool), key=key,
                products=V.zeros(v0, cap) if keep else None)
    ritz = _Ritz(jnp.zeros((wanted,), dtype), jnp.zeros((cap, wanted), dtype),
                 jnp.zeros((), bool))
    step = functools.partial(_adaptive_step, mv, k=k, which=which, tol=tol, draw=draw)
    st, ritz = jax.lax.while_loop(lambda c: ~c[0].done, lambda c: step(c[0]), (st, ritz))
    products = None if st.products is None else V.combine(ritz.coeffs, st.products)
    return ritz.values, V.combine(ritz.coeffs, st.basis), st.j, products


class _Found(NamedTuple):
    values: jax.Array   # (wanted,) ordered as `_pick` orders them
    vectors: Any        # stack of `wanted` orthonormal vectors (pytrees)
    steps: jax.Array    # Lanczos products so far
    checks: jax.Array   # check runs made
    new: jax.Array      # the last check found a value beyond the k-th
    key: jax.Array


def _merge(found: _Found, z_vals, z_vecs, *, k, which, tol):
    """Put a check run's extreme pairs among the found ones if they beat the k-th."""
    values, vectors, new = found.values, found.vectors, jnp.zeros((), bool)
    sides = {"top": [(0, 0, True)], "bottom": [(0, 0, False)],
             "both": [(0, 0, True), (k, 1, False)]}[which]
    for start, zi, hi in sides:
        side_v = values[start:start + k]
        side_x = jax.tree.map(lambda x: x[start:start + k], vectors)
        edge, z = side_v[-1], z_vals[zi]
        beats = (z > edge + tol * jnp.abs(edge)) if hi else (z < edge - tol * jnp.abs(edge))
        cand_v = jnp.concatenate([side_v, z[None]])
        cand_x = V.concat(side_x, jax.tree.map(lambda x: x[zi][None], z_vecs))
        order = jnp.argsort(-cand_v if hi else cand_v)[:k]
        values = values.at[start:start + k].set(jnp.where(beats, cand_v[order], side_v))
        vectors = jax.tree.map(
            lambda all_, c, sx: all_.at[start:start + k].set(jnp.where(beats, c[order], sx)),
            vectors, cand_x, side_x)
        new = new | beats
    return values, vectors, new


def _check_repeats(mv, found: _Found, tol, *, k, which, cap, max_checks, draw) -> _Found:
    """Search the complement of the found vectors for values beyond the k-th.

    Each check is an adaptive run (k=1 per end) on the deflated operator
    (I − YYᵀ) A (I − YYᵀ), Y the found vectors, from a random vector orthogonal to Y.
    Its pairs are orthogonal to Y with Rayleigh quotients equal to their Ritz values,
    and their residual for A exceeds the deflated one by at most ‖(AY − YΘ)ᵀz‖, the
    found pairs' own residual size. A missed copy of a repeated eigenvalue (or a missed
    eigenvalue) beats the k-th value and joins; the checks end when one finds nothing.
    """
    inner = "both" if which == "both" else which

    def body(f: _Found) -> _Found:
        y = f.vectors

        def deflated(x):
            x = V.orthogonalize(y, x)
            return V.orthogonalize(y, mv(x))

        key, k_v, k_r = jax.random.split(f.key, 3)
        v0 = V.orthogonalize(y, draw(k_v))
        z_vals, z_vecs, steps, _ = _adaptive_run(deflated, v0, k_r, tol, k=1, which=inner,
                                              cap=cap, draw=draw)
        z_vecs = V.orthogonalize_rows(y, z_vecs)
        z_norms = V.row_norms(z_vecs)
        z_vecs = jax.tree.map(
            lambda x: x / z_norms.reshape((-1,) + (1,) * (x.ndim - 1)), z_vecs)
        values, vectors, new = _merge(f, z_vals, z_vecs, k=k, which=which, tol=tol)
        return _Found(values, vectors, f.steps + steps, f.checks + 1, new, key)

    return jax.lax.while_loop(lambda f: f.new & (f.checks < max_checks), body,
                              found._replace(new=jnp.ones((), bool)))


@functools.partial(jax.jit, static_argnames=("k", "which", "cap", "max_checks", "keep",
                                             "mode", "budget", "splits"))
def _adaptive_eigen(op, key, tol, init, *, k, which, cap, max_checks, keep, mode, budget,
                    splits):
    """The adaptive Lanczos run, the repeat checks, then the pairs' residuals: from the
    run's kept products when `keep` (no checks then), otherwise one product each."""
    op = prepared(op, mode, budget)
    mv, flat, shaped, draw = _flat(op, op.matvec, splits)
    k_start, k_restart = jax.random.split(key)
    v0 = flat(_cold_start(op, k_start, which) if init is None else init)
    values, vectors, steps, products = _adaptive_run(mv, v0, k_restart, tol, k=k,
                                                     which=which, cap=cap, draw=draw,
                                                     keep=keep)
    found = _Found(values, vectors, steps, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                   jax.random.fold_in(k_restart, 1))
    if max_checks:
        found = _check_repeats(mv, found, tol, k=k, which=which, cap=cap,
                               max_checks=max_checks, draw=draw)
    checked = (found.checks > 0) & ~found.new
    if keep:   # A·y from the products taken, not from the recurrence: no product more
        res, count = V.row_norms(V.sub(products, _scale_rows(values, vectors))), steps
    else:
        res = _residuals(mv, found.values, found.vectors)
        count = found.steps + values.shape[0]
    return found.values, shaped(found.vectors), res, op.value(), count, checked


@functools.partial(jax.jit, static_argnames=("k", "max_iters", "mode", "budget"))
def _power_eigen(op, key, tol, *, k, max_iters, mode, budget):
    mv = _products(op, mode, budget)
    dtype = _info(op.params)[1]
    values = jnp.zeros((k,), dtype)
    vectors = V.zeros(op.params, k)
    count = jnp.asarray(2 * k)  # per pair: the final Rayleigh quotient and the residual
    for i in range(k):
        def deflated(x, values=values, vectors=vectors):
            return V.sub(mv(x), V.combine(values * V.coefficients(vectors, x), vectors))

        v = _unit(V.orthogonalize(vectors, V.normal(jax.random.fold_in(key, i), op.params)))

        def cond(state):
            it, _, lam, lam_prev = state
            change = jnp.abs(lam - lam_prev) / (jnp.abs(lam_prev) + 1e-12)
            return (it < max_iters) & ((it < 2) | (change >= tol))

        def body(state):
            it, v, lam, _ = state
            w = V.orthogonalize(vectors, deflated(v))
            return it + 1, _unit(w), V.dot(v, w), lam

        init = (0, v, jnp.zeros((), dtype), jnp.zeros((), dtype))
        its, v, lam, _ = jax.lax.while_loop(cond, body, init)
        count = count + its
        values = values.at[i].set(V.dot(v, mv(v)))
        vectors = V.set_row(vectors, i, v)
    order = jnp.argsort(-values)
    values, vectors = values[order], jax.tree.map(lambda x: x[order], vectors)
    return values, vectors, _residuals(mv, values, vectors), op.value(), count


def _check_mode(mode, budget) -> None:
    _validate.choice(mode, "mode", MODES)
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int)
                               or budget <= 0):
        raise ValueError(f"`budget` must be a positive number of bytes; got {budget!r}.")


def _fixed_steps(n: int, wanted: int) -> int:
    return min(n, max(3 * wanted, wanted + 30))


def _start_vector(init, op) -> jax.Array | None:
    """The sum of a previous result's eigenvectors: a warm start."""
    if init is None:
        return None
    if not isinstance(init, Eigen):
        raise ValueError(f"`init` must be an `Eigen` from an earlier `eigenvalues` call; "
                         f"got {type(init).__name__}.")
    leaves = jax.tree.leaves(init.vectors)
    if not leaves or any(jnp.ndim(x) == 0 for x in leaves):
        raise ValueError("`init.vectors` must be a pytree like params with a leading axis.")
    _validate.same_structure(jax.tree.map(lambda x: x[0], init.vectors), op.params,
                             name="init.vectors[i]")
    return jax.tree.map(lambda x, p: jnp.sum(x, axis=0).astype(jnp.result_type(p)),
                        init.vectors, op.params)


class _Program(NamedTuple):
    """The jitted routine an `eigenvalues` call runs, `fn(*args, **static)`; `rows`, the
    rows of its Lanczos basis; `finish`, its raw outputs to `(values, vectors,
    residuals, loss, num_matvecs, checked)`; `tol`, the `converged` test.
    `ls.memory.device_memory` compiles it."""

    fn: Any
    args: tuple
    static: dict
    rows: int
    finish: Any
    tol: float = 0.0


def _lanczos_program(op, key, k, which, tol, num_steps, max_steps, check, init, mode,
                     budget) -> _Program:
    """The fixed-step or the adaptive routine, with its arguments."""
    n = op.size
    wanted = 2 * k if which == "both" else k
    if num_steps is not None:
        if max_steps is not None or init is not None:
            raise ValueError("`num_steps` fixes the step count; `max_steps` and `init` "
                             "belong to the adaptive default (num_steps=None).")
        steps = min(_validate.positive_int(num_steps, "num_steps"), n)
        if steps < wanted:
            raise ValueError(f"`num_steps`={num_steps} is fewer than the {wanted} "
                             "eigenvalues asked for.")
        return _Program(_lanczos_eigen, (op, key),
                        dict(k=k, which=which, num_steps=steps, mode=mode, budget=budget,
                             splits=V.split_dims(op.params)),
                        steps, lambda out: (*out, jnp.asarray(steps + wanted),
                                            jnp.asarray(k == 1)))
    checks = (wanted + 1) if (check and k > 1) else 0
    if max_steps is None:
        cap = _fixed_steps(n, wanted)
    else:
        cap = min(_validate.positive_int(max_steps, "max_steps"), n)
    if cap < wanted:
        raise ValueError(f"`max_steps`={max_steps} is fewer than the {wanted} eigenvalues "
                         "asked for.")
    return _Program(_adaptive_eigen,
                    (op, key, jnp.asarray(tol, op.dtype), _start_vector(init, op)),
                    dict(k=k, which=which, cap=cap, max_checks=checks,
                         keep=not checks and _keeps_products(op, cap), mode=mode,
                         budget=budget, splits=V.split_dims(op.params)),
                    cap, lambda out: (*out[:5], out[5] | (k == 1)))


def _program(op, k, key, which, tol, num_steps, max_steps, check, init, method,
             max_iters, mode, budget) -> _Program:
    """`eigenvalues`' arguments checked, and the routine they select."""
    _validate.choice(which, "which", ("top", "bottom", "both"))
    _validate.choice(method, "method", ("lanczos", "power"))
    _check_mode(mode, budget)
    k = _validate.positive_int(k, "k")
    if tol is None:
        tol = 1e-3 if method == "power" else 1e-2
    if not tol > 0:
        raise ValueError(f"`tol` must be positive; got {tol!r}.")
    if check is not None and not isinstance(check, bool):
        raise ValueError(f"`check` must be True, False or None; got {check!r}.")
    n = op.size
    wanted = 2 * k if which == "both" else k
    if wanted > n:
        raise ValueError(f"`k`={k} asks for {wanted} eigenvalues of an operator of "
                         f"dimension {n}.")
    if method == "lanczos":
        return _lanczos_program(op, key, k, which, tol, num_steps, max_steps,
                                (init is None) if check is None else check, init, mode,
                                budget)._replace(tol=tol)
    if which != "top":
        raise ValueError("method='power' finds only which='top'; use 'lanczos'.")
    iters = _validate.positive_int(max_iters, "max_iters")
    return _Program(_power_eigen, (op, key, tol),
                    dict(k=k, max_iters=iters, mode=mode, budget=budget), k,
                    lambda out: (*out, jnp.asarray(k == 1)), tol)


def eigenvalues(op, k: int = 1, *, key: jax.Array, which: str = "top",
                tol: float | None = None, num_steps: int | None = None,
                max_steps: int | None = None, check: bool | None = None,
                init: Eigen | None = None, method: str = "lanczos",
                max_iters: int = 100, mode: str = "auto",
                budget: int | None = None) -> Eigen:
    """Extreme eigenvalues and eigenvectors of a symmetric operator.

    `method="lanczos"` (default) is adaptive: Lanczos with full re-orthogonalization
    inside one `lax.while_loop`, stopping as soon as every wanted Ritz pair's residual
    estimate from the recurrence (β_m times the last component of its Ritz vector) is
    at most `tol`·|θ|; `max_steps` caps the basis (preallocated, `max_steps × n`).

    What the default `tol=1e-2` guarantees: each value lies within 1e-2·|λ| of an
    eigenvalue (Weyl), and within 1e-4·|λ|²/gap (Kato-Temple), so ≤ 1e-3 relative error
    whenever the wanted eigenvalue is 10% of |λ| away from the next one. On the
    reference MLP (79k parameters) λ_max came out within 1e-4..3e-4 in 7-8 products
    (including the residual); `tol=1e-3` took 9-11 products for ~1e-6. Top-5 took 32
    products in all (the run, the check below, five residuals) for 4e-5.

    Repeated eigenvalues: a Krylov space from one vector holds one copy of each distinct
    eigenvalue, so for `k >= 2` a converged run is followed by checks: an adaptive run
    (k=1 per end) on the operator deflated by the pairs found, from a random vector
    orthogonal to them. If its value beats the k-th one found, it is a missed copy (or
    a missed eigenvalue), joins the result, and another check follows (at most
    `wanted + 1`); a check that finds nothing ends them. Cost: one k=1 run's products
    per check (about 8-10 on the reference MLP, one check when nothing is repeated);
    none for `k=1`, which cannot miss a copy. An eigenvalue of multiplicity m among the
    top k costs m − 1 more checks. `Eigen.checked` says whether the last check
    finished clean.

    Cold starts: a random unit vector plus, for the top end of a loss's curvature
    (`hessian`, `ggn`, `fisher` and their blocks), the unit loss gradient
    (`op.gradient()`: free when the products are linearized, one gradient otherwise).
    The gradient lies mostly in the top eigenspace, so fewer steps are needed (on a
    held-out MLP, 12 products instead of 16 for λ_max); the random half keeps every
    direction in the start.

    Residuals: `Eigen.residuals` are ‖A y − θ y‖ of the returned pairs, from products
    of A, never from the recurrence alone. After checks, one more product per pair.
    A run without checks (`k=1`, warm starts, `check=False`) keeps its products A·q
    beside the basis and forms A y from them, so it costs no product more: unless that
    second basis would pass 256 MiB or the parameters are sharded.

    `num_steps` given: exactly `num_steps` Lanczos steps in a `lax.scan` (the behaviour
    before the adaptive default), no check. `init`: a previous `Eigen` (same `k` and
    `which`, e.g. from the last measurement along training) whose eigenvectors' sum is
    the starting vector; warm starts skip the check unless `check=True`.

    `method="power"`: power iteration with deflation, for comparison; it finds the
    largest-*magnitude* eigenvalues one after another, stopping when the Rayleigh
    quotient changes by less than `tol` (relative, default 1e-3) or after `max_iters`
    matvecs each. Only `which="top"`, and right only when the top eigenvalues dominate
    in magnitude. Its pairs often report `converged=False`: read the residuals.

    Every operator product happens inside one jitted routine (`_adaptive_eigen`,
    `_lanczos_eigen`, `_power_eigen`) that receives the operator as a pytree.

    Args:
      op: any operator with `.matvec` and `.params` (`hessian`, `ggn`, `fisher`,
        `LinearOperator`).
      k: how many eigenpairs (per end for `which="both"`).
      key: PRNG key for the starting vector; results are deterministic given it.
      which: `"top"` (largest algebraic), `"bottom"` (smallest) or `"both"`.
      tol: relative residual target and the `converged` test (default 1e-2; 1e-3 for
        `method="power"`, where it bounds the change of the Rayleigh quotient).
      num_steps: a fixed number of Lanczos steps instead of the adaptive stop.
      max_steps: cap on the rows of each adaptive run (default `min(n, max(3w, w + 30))`
        for `w` wanted values, the fixed-step default); memory `max_steps × n`.
      check: look for missed copies of repeated eigenvalues (default: for cold starts).
      init: a previous `Eigen` to warm-start from.
      mode, budget: how the operator is prepared for its many products
        (`ls.prepared`): `"auto"` (default) linearizes the gradient (or the model's
        outputs) once inside the routine when the stored residuals fit `budget` bytes
        (default a quarter of the device's memory), so each product runs only its
        tangent; `"linearize"` always, `"plain"` never. Values agree to rounding.

    Returns:
      `Eigen(values, vectors, residuals, converged, num_matvecs, checked)`.

    Example:
      >>> H = ls.hessian(loss_fn, params, batch)
      >>> eig = ls.eigenvalues(H, k=5, key=jax.random.key(0))
      >>> eig.values, eig.residuals, eig.num_matvecs
      >>> later = ls.eigenvalues(H_later, k=5, key=key, init=eig)   # warm start
    """
    p = _program(op, k, key, which, tol, num_steps, max_steps, check, init, method,
                 max_iters, mode, budget)
    values, vectors, res, loss, count, checked = p.finish(p.fn(*p.args, **p.static))
    _validate.check_finite("The operator", values, res, loss)
    converged = res <= p.tol * jnp.abs(values)
    return Eigen(values, vectors, res, converged, count, checked)


# ------------------------------------------------------------- spectral density ---

class Density(NamedTuple):
    """Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019).

    The density is `(1/P) Σ_p Σ_j weights[p, j] δ(λ − nodes[p, j])`, a probability
    measure whose k-th moment estimates `tr(Aᵏ)/n`. `grid` and `values` hold the same
    measure smoothed by a Gaussian of width `sigma`.
    """

    nodes: jax.Array  # (num_probes, num_steps)
    weights: jax.Array  # (num_probes, num_steps), each row sums to 1
    grid: jax.Array
    values: jax.Array
    sigma: jax.Array

    @property
    def num_probes(self) -> int:
        return self.nodes.shape[0]

    @property
    def num_steps(self) -> int:
        return self.nodes.shape[1]

    def moments(self, order: int) -> tuple[jax.Array, jax.Array]:
        """Estimate of `tr(A^order)/n` and its standard error across probes."""
        per_probe = jnp.sum(self.weights * self.nodes**order, axis=1)
        err = jnp.std(per_probe, ddof=1) / jnp.sqrt(per_probe.shape[0]) if (
            per_probe.shape[0] > 1) else jnp.full((), jnp.nan, per_probe.dtype)
        return per_probe.mean(), err

    def smooth(self, grid: jax.Array, sigma: float) -> jax.Array:
        """The density convolved with a Gaussian of width `sigma`, evaluated on `grid`."""
        return _smooth(self.nodes, self.weights, jnp.asarray(grid), sigma)


def _smooth(nodes, weights, grid, sigma):
    z = (grid[:, None, None] - nodes[None]) / sigma
    g = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.sum(g * weights[None], axis=(1, 2)) / nodes.shape[0]


@functools.partial(jax.jit, static_argnames=("num_probes", "num_steps", "num_points",
                                             "block_size", "mode", "budget", "splits"))
def _slq(op, key, sigma, *, num_probes, num_steps, num_points, block_size, mode, budget,
         splits):
    mv, flat, _, draw = _flat(op, _products(op, mode, budget), splits)
    dtype = _info(op.params)[1]
    k_probe, k_restart = jax.random.split(key)

    def one(args):
        kp, k = args
        alphas, betas, _ = lanczos(mv, flat(V.rademacher(kp, op.params)), num_steps, k,
                                   draw=draw)
        theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return theta, s[0] ** 2

    # batch_size vmaps `one` over blocks of probes: every product becomes a matmat. Not
    # for blocks of one: under vmap the breakdown `cond` becomes a select that draws and
    # orthogonalizes a restart vector at every step (measured 2x slower per product).
    nodes, weights = jax.lax.map(one, (jax.random.split(k_probe, num_probes),
                                       jax.random.split(k_restart, num_probes)),
                                 batch_size=None if block_size == 1 else block_size)
    lo, hi = nodes.min(), nodes.max()
    width = jnp.maximum(hi - lo, jnp.finfo(dtype).eps * jnp.maximum(1.0, jnp.abs(hi)))
    sigma = jnp.where(sigma > 0, sigma, 0.01 * width)
    grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    return (nodes, weights, grid, _smooth(nodes, weights, grid, sigma), sigma), op.value()


_BLOCK_BYTES = 2**31  # Lanczos bases of one block of probes, on accelerators


def _block_size(block_size, num_probes, num_steps, op) -> int:
    if block_size is not None:
        return min(_validate.positive_int(block_size, "block_size"), num_probes)
    if jax.default_backend() == "cpu":
        return 1
    per_probe = num_steps * op.size * jnp.dtype(op.dtype).itemsize
    return max(1, min(num_probes, _BLOCK_BYTES // per_probe))


def density(op, *, key: jax.Array, num_probes: int = 10, num_steps: int = 80,
            sigma: float | None = None, num_points: int = 1000,
            block_size: int | None = None, mode: str = "auto",
            budget: int | None = None) -> Density:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each of `num_probes` Rademacher probes runs `num_steps` Lanczos steps; the Ritz
    values are the quadrature nodes and the squared first components of the Ritz
    vectors the weights. Moments up to order `2 num_steps − 1` are exact per probe, so
    `density.moments(k)` is an unbiased estimate of `tr(Aᵏ)/n`.

    Args:
      sigma: Gaussian smoothing width for `grid`/`values`; default 1% of the node range.
      num_points: grid points for the smoothed density.
      block_size: probes run together, their products batched into one `vmap`ped
        matvec (matrix-matrix work). Default: 1 on CPU, where batched products measured
        slower than one at a time; elsewhere as many as fit `num_steps × n` bases in
        2 GiB. Values do not depend on it.
      mode, budget: how the operator is prepared for its products, as in
        `eigenvalues` (`ls.prepared`; default `"auto"`: linearize once when it fits).

    Cost: `num_probes × num_steps` products; memory `block_size × num_steps × n`.

    Example:
      >>> den = ls.density(H, key=jax.random.key(0), num_probes=8, num_steps=60)
      >>> plt.semilogy(den.grid, den.values)
    """
    _check_mode(mode, budget)
    num_probes = _validate.positive_int(num_probes, "num_probes")
    num_steps = min(_validate.positive_int(num_steps, "num_steps"), op.size)
    num_points = _validate.positive_int(num_points, "num_points")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"`sigma` must be positive; got {sigma!r}.")
    block = _block_size(block_size, num_probes, num_steps, op)
    out, loss = _slq(op, key, jnp.asarray(-1.0 if sigma is None else sigma),
                     num_probes=num_probes, num_steps=num_steps, num_points=num_points,
                     block_size=block, mode=mode, budget=budget,
                     splits=V.split_dims(op.params))
    _validate.check_finite("The operator", out[0], out[1], loss)
    return Density(*out)
