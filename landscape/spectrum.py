"""Eigenvalues and spectral density of any symmetric operator on parameter pytrees.

Lanczos with full re-orthogonalization runs on the flattened parameter vector. By
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
from jax.flatten_util import ravel_pytree

from landscape import _validate


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


def _orthogonalize(basis: jax.Array, w: jax.Array) -> jax.Array:
    """Remove the span of the rows of `basis` from `w` (two classical Gram-Schmidt passes)."""
    w = w - basis.T @ (basis @ w)
    return w - basis.T @ (basis @ w)


def lanczos(mv, v0: jax.Array, num_steps: int, key: jax.Array):
    """`num_steps` Lanczos steps from `v0` with full re-orthogonalization.

    Returns `(alphas, betas, basis)`: the tridiagonal matrix's diagonal `(m,)`, its
    couplings `(m,)` (`betas[j]` couples steps j and j+1; zero marks a restart) and the
    orthonormal basis `(m, n)`.
    """
    n = v0.shape[0]
    dtype = v0.dtype
    tol = 10.0 * jnp.sqrt(n) * jnp.finfo(dtype).eps
    basis = jnp.zeros((num_steps, n), dtype)

    def step(carry, j):
        basis, q, q_prev, beta_prev, scale, key = carry
        basis = basis.at[j].set(q)
        w = mv(q)
        alpha = jnp.vdot(q, w)
        w = _orthogonalize(basis, w - alpha * q - beta_prev * q_prev)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.maximum(jnp.abs(alpha), beta))
        key, sub = jax.random.split(key)
        broke = beta <= tol * scale

        def restart(_):
            r = _orthogonalize(basis, jax.random.normal(sub, (n,), dtype))
            return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(dtype).tiny)

        q_next = jax.lax.cond(broke, restart,
                              lambda _: w / jnp.where(broke, 1.0, beta), None)
        beta = jnp.where(broke, 0.0, beta)
        return (basis, q_next, q, beta, scale, key), (alpha, beta)

    q0 = v0 / jnp.linalg.norm(v0)
    zero = jnp.zeros((), dtype)
    init = (basis, q0, jnp.zeros_like(q0), zero, zero, key)
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


def _residuals(mv, values, vectors):
    av = jax.lax.map(mv, vectors)
    return jnp.linalg.norm(av - values[:, None] * vectors, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "which", "num_steps"))
def _lanczos_eigen(op, key, *, k, which, num_steps):
    mv, flat = op.flat_matvec()
    k_start, k_restart = jax.random.split(key)
    v0 = jax.random.normal(k_start, flat.shape, flat.dtype)
    alphas, betas, basis = lanczos(mv, v0, num_steps, k_restart)
    theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
    idx = _pick(theta, k, which)
    values = theta[idx]
    vectors = s[:, idx].T @ basis
    return values, vectors, _residuals(mv, values, vectors), op.value()


# ------------------------------------------------------------ adaptive Lanczos ---

class _Ritz(NamedTuple):
    """Wanted Ritz pairs of the rows filled so far (see `_ritz`)."""

    values: jax.Array   # (wanted,)
    coeffs: jax.Array   # (cap, wanted) their eigenvectors of T, in basis coordinates
    done: jax.Array     # every wanted pair's residual estimate <= tol·|θ|


class _State(NamedTuple):
    j: jax.Array          # row of the vector `q` about to be applied
    basis: jax.Array      # (cap, n), rows 0..j-1 filled
    alphas: jax.Array     # (cap,) diagonal of T
    couple: jax.Array     # (cap,) couple[r] links rows r and r+1 (0 at a restart)
    out: jax.Array        # (cap,) the β dropped at a breakdown restart (round-off size)
    q: jax.Array
    q_prev: jax.Array
    beta_prev: jax.Array
    scale: jax.Array
    done: jax.Array
    key: jax.Array


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


def _restart_vector(basis, key, n, dtype):
    r = _orthogonalize(basis, jax.random.normal(key, (n,), dtype))
    return r / jnp.maximum(jnp.linalg.norm(r), jnp.finfo(dtype).tiny)


def _adaptive_step(mv, st: _State, *, k, which, tol) -> tuple[_State, _Ritz]:
    """One Lanczos product (as `lanczos`), then the stopping test."""
    cap, n = st.basis.shape
    dtype, j = st.basis.dtype, st.j
    basis = st.basis.at[j].set(st.q)
    w = mv(st.q)
    alpha = jnp.vdot(st.q, w)
    w = _orthogonalize(basis, w - alpha * st.q - st.beta_prev * st.q_prev)
    beta = jnp.linalg.norm(w)
    scale = jnp.maximum(st.scale, jnp.maximum(jnp.abs(alpha), beta))
    broke = beta <= 10.0 * jnp.sqrt(n) * jnp.finfo(dtype).eps * scale
    st = st._replace(basis=basis, alphas=st.alphas.at[j].set(alpha))
    ritz = _ritz(st, beta, k=k, which=which, tol=tol)
    key, sub = jax.random.split(st.key)
    q_next = jax.lax.cond(broke, lambda: _restart_vector(basis, sub, n, dtype),
                          lambda: w / jnp.where(broke, 1.0, beta))
    return st._replace(
        j=j + 1, couple=st.couple.at[j].set(jnp.where(broke, 0.0, beta)),
        out=st.out.at[j].set(jnp.where(broke, beta, 0.0)), q=q_next, q_prev=st.q,
        beta_prev=jnp.where(broke, 0.0, beta), scale=scale,
        done=ritz.done | (j + 1 >= cap), key=key), ritz


def _adaptive_run(mv, v0, key, tol, *, k, which, cap):
    """Lanczos from `v0` until the wanted pairs converge or `cap` rows are filled.

    Returns `(values, vectors, steps)`, the wanted pairs ordered as `_pick` orders them.
    """
    n, dtype = v0.shape[0], v0.dtype
    zero, wanted = jnp.zeros((), dtype), 2 * k if which == "both" else k
    st = _State(j=jnp.zeros((), jnp.int32), basis=jnp.zeros((cap, n), dtype),
                alphas=jnp.zeros((cap,), dtype), couple=jnp.zeros((cap,), dtype),
                out=jnp.zeros((cap,), dtype), q=v0 / jnp.linalg.norm(v0),
                q_prev=jnp.zeros((n,), dtype), beta_prev=zero, scale=zero,
                done=jnp.zeros((), bool), key=key)
    ritz = _Ritz(jnp.zeros((wanted,), dtype), jnp.zeros((cap, wanted), dtype),
                 jnp.zeros((), bool))
    step = functools.partial(_adaptive_step, mv, k=k, which=which, tol=tol)
    st, ritz = jax.lax.while_loop(lambda c: ~c[0].done, lambda c: step(c[0]), (st, ritz))
    return ritz.values, ritz.coeffs.T @ st.basis, st.j


class _Found(NamedTuple):
    values: jax.Array   # (wanted,) ordered as `_pick` orders them
    vectors: jax.Array  # (wanted, n) orthonormal
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
        side_v, side_x = values[start:start + k], vectors[start:start + k]
        edge, z = side_v[-1], z_vals[zi]
        beats = (z > edge + tol * jnp.abs(edge)) if hi else (z < edge - tol * jnp.abs(edge))
        cand_v = jnp.concatenate([side_v, z[None]])
        cand_x = jnp.concatenate([side_x, z_vecs[zi][None]])
        order = jnp.argsort(-cand_v if hi else cand_v)[:k]
        values = values.at[start:start + k].set(jnp.where(beats, cand_v[order], side_v))
        vectors = vectors.at[start:start + k].set(
            jnp.where(beats, cand_x[order], side_x))
        new = new | beats
    return values, vectors, new


def _check_repeats(mv, found: _Found, tol, *, k, which, cap, max_checks) -> _Found:
    """Search the complement of the found vectors for values beyond the k-th.

    Each check is an adaptive run (k=1 per end) on the deflated operator
    (I − YYᵀ) A (I − YYᵀ), Y the found vectors, from a random vector orthogonal to Y.
    Its pairs are orthogonal to Y with Rayleigh quotients equal to their Ritz values,
    and their residual for A exceeds the deflated one by at most ‖(AY − YΘ)ᵀz‖, the
    found pairs' own residual size. A missed copy of a repeated eigenvalue (or a missed
    eigenvalue) beats the k-th value and joins; the checks end when one finds nothing.
    """
    n, dtype = found.vectors.shape[1], found.vectors.dtype
    inner = "both" if which == "both" else which

    def body(f: _Found) -> _Found:
        y = f.vectors

        def deflated(x):
            x = _orthogonalize(y, x)
            return _orthogonalize(y, mv(x))

        key, k_v, k_r = jax.random.split(f.key, 3)
        v0 = _orthogonalize(y, jax.random.normal(k_v, (n,), dtype))
        z_vals, z_vecs, steps = _adaptive_run(deflated, v0, k_r, tol, k=1, which=inner,
                                              cap=cap)
        z_vecs = _orthogonalize(y, z_vecs.T).T
        z_vecs = z_vecs / jnp.linalg.norm(z_vecs, axis=1, keepdims=True)
        values, vectors, new = _merge(f, z_vals, z_vecs, k=k, which=which, tol=tol)
        return _Found(values, vectors, f.steps + steps, f.checks + 1, new, key)

    return jax.lax.while_loop(lambda f: f.new & (f.checks < max_checks), body,
                              found._replace(new=jnp.ones((), bool)))


@functools.partial(jax.jit, static_argnames=("k", "which", "cap", "max_checks"))
def _adaptive_eigen(op, key, tol, init, *, k, which, cap, max_checks):
    """The adaptive Lanczos run, the repeat checks, then true residuals (one product each)."""
    mv, flat = op.flat_matvec()
    n, dtype = flat.shape[0], flat.dtype
    k_start, k_restart = jax.random.split(key)
    v0 = jax.random.normal(k_start, (n,), dtype) if init is None else init
    values, vectors, steps = _adaptive_run(mv, v0, k_restart, tol, k=k, which=which, cap=cap)
    found = _Found(values, vectors, steps, jnp.zeros((), jnp.int32), jnp.zeros((), bool),
                   jax.random.fold_in(k_restart, 1))
    if max_checks:
        found = _check_repeats(mv, found, tol, k=k, which=which, cap=cap,
                               max_checks=max_checks)
    checked = (found.checks > 0) & ~found.new
    res = _residuals(mv, found.values, found.vectors)
    return (found.values, found.vectors, res, op.value(), found.steps + values.shape[0],
            checked)


@functools.partial(jax.jit, static_argnames=("k", "max_iters"))
def _power_eigen(op, key, tol, *, k, max_iters):
    mv, flat = op.flat_matvec()
    n = flat.shape[0]
    values = jnp.zeros((k,), flat.dtype)
    vectors = jnp.zeros((k, n), flat.dtype)
    count = jnp.asarray(2 * k)  # per pair: the final Rayleigh quotient and the residual
    for i in range(k):
        def deflated(x, values=values, vectors=vectors):
            return mv(x) - vectors.T @ (values * (vectors @ x))

        v = _orthogonalize(vectors, jax.random.normal(jax.random.fold_in(key, i), (n,),
                                                      flat.dtype))
        v = v / jnp.linalg.norm(v)

        def cond(state):
            it, _, lam, lam_prev = state
            change = jnp.abs(lam - lam_prev) / (jnp.abs(lam_prev) + 1e-12)
            return (it < max_iters) & ((it < 2) | (change >= tol))

        def body(state):
            it, v, lam, _ = state
            w = deflated(v)
            w = _orthogonalize(vectors, w)
            return it + 1, w / jnp.linalg.norm(w), jnp.vdot(v, w), lam

        init = (0, v, jnp.zeros((), flat.dtype), jnp.zeros((), flat.dtype))
        its, v, lam, _ = jax.lax.while_loop(cond, body, init)
        count = count + its
        values = values.at[i].set(jnp.vdot(v, mv(v)))
        vectors = vectors.at[i].set(v)
    order = jnp.argsort(-values)
    values, vectors = values[order], vectors[order]
    return values, vectors, _residuals(mv, values, vectors), op.value(), count


def _fixed_steps(n: int, wanted: int) -> int:
    return min(n, max(3 * wanted, wanted + 30))


def _start_vector(init, op) -> jax.Array | None:
    """The sum of a previous result's eigenvectors, flattened: a warm start."""
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
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(init.vectors)
    return jnp.sum(flat, axis=0).astype(op.dtype)


def _lanczos_call(op, key, k, which, tol, num_steps, max_steps, check, init):
    """Dispatch to the fixed-step or the adaptive routine; returns its raw outputs."""
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
        values, vectors, res, loss = _lanczos_eigen(op, key, k=k, which=which,
                                                    num_steps=steps)
        return values, vectors, res, loss, jnp.asarray(steps + wanted), jnp.asarray(k == 1)
    checks = (wanted + 1) if (check and k > 1) else 0
    if max_steps is None:
        cap = _fixed_steps(n, wanted)
    else:
        cap = min(_validate.positive_int(max_steps, "max_steps"), n)
    if cap < wanted:
        raise ValueError(f"`max_steps`={max_steps} is fewer than the {wanted} eigenvalues "
                         "asked for.")
    out = _adaptive_eigen(op, key, jnp.asarray(tol, op.dtype), _start_vector(init, op),
                          k=k, which=which, cap=cap, max_checks=checks)
    return (*out[:5], out[5] | (k == 1))


def eigenvalues(op, k: int = 1, *, key: jax.Array, which: str = "top",
                tol: float | None = None, num_steps: int | None = None,
                max_steps: int | None = None, check: bool | None = None,
                init: Eigen | None = None, method: str = "lanczos",
                max_iters: int = 100) -> Eigen:
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

    Returns:
      `Eigen(values, vectors, residuals, converged, num_matvecs, checked)`.

    Example:
      >>> H = ls.hessian(loss_fn, params, batch)
      >>> eig = ls.eigenvalues(H, k=5, key=jax.random.key(0))
      >>> eig.values, eig.residuals, eig.num_matvecs
      >>> later = ls.eigenvalues(H_later, k=5, key=key, init=eig)   # warm start
    """
    _validate.choice(which, "which", ("top", "bottom", "both"))
    _validate.choice(method, "method", ("lanczos", "power"))
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
    unravel = ravel_pytree(op.params)[1]
    if method == "power":
        if which != "top":
            raise ValueError("method='power' finds only which='top'; use 'lanczos'.")
        iters = _validate.positive_int(max_iters, "max_iters")
        values, vectors, res, loss, count = _power_eigen(op, key, tol, k=k, max_iters=iters)
        checked = jnp.asarray(k == 1)
    else:
        values, vectors, res, loss, count, checked = _lanczos_call(
            op, key, k, which, tol, num_steps, max_steps,
            (init is None) if check is None else check, init)
    _validate.check_finite("The operator", values, res, loss)
    converged = res <= tol * jnp.abs(values)
    return Eigen(values, jax.vmap(unravel)(vectors), res, converged, count, checked)


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
                                             "block_size"))
def _slq(op, key, sigma, *, num_probes, num_steps, num_points, block_size):
    mv, flat = op.flat_matvec()
    n = flat.shape[0]
    k_probe, k_restart = jax.random.split(key)
    probes = jax.random.rademacher(k_probe, (num_probes, n), flat.dtype)

    def one(args):
        v, k = args
        alphas, betas, _ = lanczos(mv, v, num_steps, k)
        theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return theta, s[0] ** 2

    # batch_size vmaps `one` over blocks of probes: every product becomes a matmat. Not
    # for blocks of one: under vmap the breakdown `cond` becomes a select that draws and
    # orthogonalizes a restart vector at every step (measured 2x slower per product).
    nodes, weights = jax.lax.map(one, (probes, jax.random.split(k_restart, num_probes)),
                                 batch_size=None if block_size == 1 else block_size)
    lo, hi = nodes.min(), nodes.max()
    width = jnp.maximum(hi - lo, jnp.finfo(flat.dtype).eps * jnp.maximum(1.0, jnp.abs(hi)))
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
            block_size: int | None = None) -> Density:
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

    Cost: `num_probes × num_steps` products; memory `block_size × num_steps × n`.

    Example:
      >>> den = ls.density(H, key=jax.random.key(0), num_probes=8, num_steps=60)
      >>> plt.semilogy(den.grid, den.values)
    """
    num_probes = _validate.positive_int(num_probes, "num_probes")
    num_steps = min(_validate.positive_int(num_steps, "num_steps"), op.size)
    num_points = _validate.positive_int(num_points, "num_points")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"`sigma` must be positive; got {sigma!r}.")
    block = _block_size(block_size, num_probes, num_steps, op)
    out, loss = _slq(op, key, jnp.asarray(-1.0 if sigma is None else sigma),
                     num_probes=num_probes, num_steps=num_steps, num_points=num_points,
                     block_size=block)
    _validate.check_finite("The operator", out[0], out[1], loss)
    return Density(*out)
