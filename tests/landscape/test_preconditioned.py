"""ls.preconditioned against dense D^{-1/2} H D^{-1/2} in float64."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def setup():
    params = m.mlp_params(jax.random.key(1), sizes=(4, 5, 3))  # 43 parameters
    batch = m.classification_data(jax.random.key(2), d=4)
    H = ls.hessian(m.ce_loss, params, batch)
    dense = np.asarray(m.dense_hessian(m.ce_loss, params, batch))
    # A diagonal spread over two orders of magnitude, like an Adam state's.
    diag = jax.tree.map(lambda p: jnp.exp(2.0 * jax.random.normal(KEY, p.shape)), params)
    return params, H, dense, diag


def _reference(dense, diag):
    d = np.asarray(ravel_pytree(diag)[0])
    s = 1.0 / np.sqrt(d)
    return s[:, None] * dense * s[None, :]


def test_dense_matches_scaled_hessian(setup):
    params, H, dense, diag = setup
    A = ls.preconditioned(H, diag)
    ref = _reference(dense, diag)
    np.testing.assert_allclose(A.dense(), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(A.dense(), A.dense().T, atol=1e-12)
    # Same spectrum as P^-1 H (a similar, non-symmetric matrix).
    d = np.asarray(ravel_pytree(diag)[0])
    nonsym = np.sort(np.linalg.eigvals(dense / d[:, None]).real)
    np.testing.assert_allclose(np.linalg.eigvalsh(ref), nonsym, rtol=1e-7, atol=1e-9)


@pytest.mark.slow
def test_spectrum_tools_apply(setup):
    params, H, dense, diag = setup
    A = ls.preconditioned(H, diag)
    ref = np.linalg.eigvalsh(_reference(dense, diag))[::-1]
    eig = ls.eigenvalues(A, k=3, key=KEY, num_steps=43, tol=1e-8)
    np.testing.assert_allclose(eig.values, ref[:3], rtol=1e-8)
    assert eig.converged.all()
    # Under jit, with the operator as an argument.
    top = jax.jit(lambda op: ls.eigenvalues(op, k=1, key=KEY, num_steps=43).values[0])
    np.testing.assert_allclose(top(A), ref[0], rtol=1e-8)
    tr = ls.trace(A, key=KEY, num_probes=43 * 3, method="hutch++")
    np.testing.assert_allclose(tr.value, ref.sum(), rtol=1e-6)


@pytest.mark.parametrize("which", ["top", "both"])
def test_adaptive_default_on_a_preconditioned_hessian(setup, which):
    """The adaptive default (cold start included) on a wrapper of a Hessian: a
    preconditioned operator has no loss gradient of its own, so it starts at random."""
    params, H, dense, diag = setup
    ref = np.linalg.eigvalsh(_reference(dense, diag))
    eig = ls.eigenvalues(ls.preconditioned(H, diag), k=1, key=KEY, which=which, tol=1e-8)
    want = [ref[-1]] if which == "top" else [ref[-1], ref[0]]
    np.testing.assert_allclose(eig.values, want, rtol=1e-7)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("s",), meta_fields=())
@dataclasses.dataclass(frozen=True)
class _Scale:
    s: jax.Array

    def __call__(self, v):
        return v * self.s


def test_callable_forms_match_diagonal():
    A = jnp.diag(jnp.arange(1.0, 6.0)) + 0.1
    op = ls.LinearOperator(lambda v: A @ v, jnp.zeros(5))
    d = jnp.array([1.0, 4.0, 0.25, 9.0, 2.0])
    ref = np.asarray(A) / np.sqrt(np.outer(d, d))
    for precond in (d, lambda v: v / jnp.sqrt(d), _Scale(1.0 / jnp.sqrt(d))):
        np.testing.assert_allclose(ls.preconditioned(op, precond).dense(), ref, rtol=1e-12)
    # A pytree callable keeps its arrays as data: jit sees them as arguments.
    out = jax.jit(lambda o: o.matvec(jnp.ones(5)))(ls.preconditioned(op, _Scale(d)))
    np.testing.assert_allclose(out, np.asarray(d) * (np.asarray(A) @ np.asarray(d)))


def test_bad_input_names_the_argument(setup):
    params, H, _, diag = setup
    bad = jax.tree.map(lambda d: d.at[0].set(0.0) if d.ndim == 1 else d, diag)
    with pytest.raises(ValueError, match="precond"):
        ls.preconditioned(H, bad)
    with pytest.raises(ValueError, match="precond"):
        ls.preconditioned(H, {"layer0": diag["layer0"]})
    with pytest.raises(ValueError, match="op"):
        ls.preconditioned("H", diag)
