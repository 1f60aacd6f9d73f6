"""Eigenvalues and spectral density of any symmetric operator on parameter pytrees.

Lanczos with full re-orthogonalization runs on the flattened parameter vector inside
one `lax.scan`. When the Krylov space closes (the residual vanishes: low-rank
curvature, clustered eigenvalues) it restarts from a random vector orthogonal to the
basis and records a zero coupling, so the tridiagonal matrix stays exact instead of
filling with rounding noise.
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
    """

    values: jax.Array
    vectors: Any
    residuals: jax.Array
    converged: jax.Array | None = None


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


@functools.partial(jax.jit, static_argnames=("k", "max_iters"))
def _power_eigen(op, key, tol, *, k, max_iters):
    mv, flat = op.flat_matvec()
    n = flat.shape[0]
    values = jnp.zeros((k,), flat.dtype)
    vectors = jnp.zeros((k, n), flat.dtype)
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
        _, v, lam, _ = jax.lax.while_loop(cond, body, init)
        values = values.at[i].set(jnp.vdot(v, mv(v)))
        vectors = vectors.at[i].set(v)
    order = jnp.argsort(-values)
    values, vectors = values[order], vectors[order]
    return values, vectors, _residuals(mv, values, vectors), op.value()


def eigenvalues(op, k: int = 1, *, key: jax.Array, which: str = "top",
                num_steps: int | None = None, method: str = "lanczos",
                tol: float = 1e-3, max_iters: int = 100) -> Eigen:
    """Extreme eigenvalues and eigenvectors of a symmetric operator.

    `method="lanczos"` (default): `num_steps` Lanczos steps with full
    re-orthogonalization (default `min(n, max(3k, k + 30))`), Ritz pairs from the
    tridiagonal matrix. Memory: `num_steps × n` for the basis.

    `method="power"`: power iteration with deflation, for comparison; it finds the
    largest-*magnitude* eigenvalues one after another, stopping when the Rayleigh
    quotient changes by less than `tol` (relative) or after `max_iters` matvecs each.
    Only `which="top"`, and right only when the top eigenvalues dominate in magnitude.
    Its stopping rule is weaker than the residual test, so its pairs often report
    `converged=False` at the default `tol`: read the residuals.

    Args:
      op: any operator with `.matvec` and `.params` (`hessian`, `ggn`, `fisher`,
        `LinearOperator`).
      k: how many eigenpairs (per end for `which="both"`).
      key: PRNG key for the starting vector; results are deterministic given it.
      which: `"top"` (largest algebraic), `"bottom"` (smallest) or `"both"`.
      tol: a pair counts as converged when `‖A x − λ x‖ <= tol·|λ|`; power iteration
        also stops once the Rayleigh quotient changes by less than `tol` (relative).

    Returns:
      `Eigen(values, vectors, residuals, converged)`.

    Example:
      >>> H = ls.hessian(loss_fn, params, batch)
      >>> eig = ls.eigenvalues(H, k=5, key=jax.random.key(0))
      >>> eig.values, eig.residuals, eig.converged
    """
    _validate.choice(which, "which", ("top", "bottom", "both"))
    _validate.choice(method, "method", ("lanczos", "power"))
    k = _validate.positive_int(k, "k")
    if not tol > 0:
        raise ValueError(f"`tol` must be positive; got {tol!r}.")
    n = op.size
    wanted = 2 * k if which == "both" else k
    if wanted > n:
        raise ValueError(f"`k`={k} asks for {wanted} eigenvalues of an operator of "
                         f"dimension {n}.")
    unravel = ravel_pytree(op.params)[1]
    if method == "power":
        if which != "top":
            raise ValueError("method='power' finds only which='top'; use 'lanczos'.")
        values, vectors, res, loss = _power_eigen(op, key, tol, k=k,
                                            max_iters=_validate.positive_int(max_iters, "max_iters"))
    else:
        steps = min(n, max(3 * wanted, wanted + 30)) if num_steps is None else min(
            _validate.positive_int(num_steps, "num_steps"), n)
        if steps < wanted:
            raise ValueError(f"`num_steps`={num_steps} is fewer than the {wanted} "
                             "eigenvalues asked for.")
        values, vectors, res, loss = _lanczos_eigen(op, key, k=k, which=which, num_steps=steps)
    _validate.check_finite("The operator", values, res, loss)
    converged = res <= tol * jnp.abs(values)
    return Eigen(values, jax.vmap(unravel)(vectors), res, converged)


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


@functools.partial(jax.jit, static_argnames=("num_probes", "num_steps", "num_points"))
def _slq(op, key, sigma, *, num_probes, num_steps, num_points):
    mv, flat = op.flat_matvec()
    n = flat.shape[0]
    k_probe, k_restart = jax.random.split(key)
    probes = jax.random.rademacher(k_probe, (num_probes, n), flat.dtype)

    def one(args):
        v, k = args
        alphas, betas, _ = lanczos(mv, v, num_steps, k)
        theta, s = jnp.linalg.eigh(_tridiagonal(alphas, betas))
        return theta, s[0] ** 2

    nodes, weights = jax.lax.map(one, (probes, jax.random.split(k_restart, num_probes)))
    lo, hi = nodes.min(), nodes.max()
    width = jnp.maximum(hi - lo, jnp.finfo(flat.dtype).eps * jnp.maximum(1.0, jnp.abs(hi)))
    sigma = jnp.where(sigma > 0, sigma, 0.01 * width)
    grid = jnp.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    return (nodes, weights, grid, _smooth(nodes, weights, grid, sigma), sigma), op.value()


def density(op, *, key: jax.Array, num_probes: int = 10, num_steps: int = 80,
            sigma: float | None = None, num_points: int = 1000) -> Density:
    """Spectral density of a symmetric operator by stochastic Lanczos quadrature.

    Each of `num_probes` Rademacher probes runs `num_steps` Lanczos steps; the Ritz
    values are the quadrature nodes and the squared first components of the Ritz
    vectors the weights. Moments up to order `2 num_steps − 1` are exact per probe, so
    `density.moments(k)` is an unbiased estimate of `tr(Aᵏ)/n`.

    Args:
      sigma: Gaussian smoothing width for `grid`/`values`; default 1% of the node range.
      num_points: grid points for the smoothed density.

    Example:
      >>> den = ls.density(H, key=jax.random.key(0), num_probes=8, num_steps=60)
      >>> plt.semilogy(den.grid, den.values)
    """
    num_probes = _validate.positive_int(num_probes, "num_probes")
    num_steps = min(_validate.positive_int(num_steps, "num_steps"), op.size)
    num_points = _validate.positive_int(num_points, "num_points")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"`sigma` must be positive; got {sigma!r}.")
    out, loss = _slq(op, key, jnp.asarray(-1.0 if sigma is None else sigma),
               num_probes=num_probes, num_steps=num_steps, num_points=num_points)
    _validate.check_finite("The operator", out[0], out[1], loss)
    return Density(*out)
