"""Adaptive Lanczos: early stop, repeat checks, warm starts, against numpy.linalg."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m

KEY = jax.random.key(0)
TOL = 1e-2  # the default


def operator(spectrum, seed=0):
    """`A = Q diag(spectrum) Qᵀ` in a random orthogonal basis, and A itself."""
    n = len(spectrum)
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    a = q @ np.diag(spectrum) @ q.T
    aj = jnp.asarray(a)
    return ls.LinearOperator(lambda v: aj @ v, jnp.zeros(n)), a


def counting(op):
    """`op` with a host-side counter of its matvecs (independent of `num_matvecs`)."""
    count = [0]

    def tick():
        count[0] += 1

    def mv(v):
        jax.debug.callback(tick)
        return op.matvec(v)

    return ls.LinearOperator(mv, op.params), count


def reference(spectrum, k, which):
    s = np.sort(spectrum)
    return {"top": s[::-1][:k], "bottom": s[:k],
            "both": np.concatenate([s[::-1][:k], s[:k][::-1]])}[which]


def fixed_default(n, wanted):
    return min(n, max(3 * wanted, wanted + 30)) + wanted


REPEATED_TOP = np.concatenate([[6.0, 6.0, 6.0], np.linspace(-5, 5, 37)])  # issue 17
SPECTRA = {
    "clusters": np.concatenate([[10.0, 9.99, 9.98, 5.0, 4.99], np.linspace(-1, 1, 55)]),
    "negatives": np.concatenate([np.linspace(-8.0, -4.0, 5), np.linspace(-1, 2, 55)]),
    "tiny gap": np.concatenate([[5.0, 5.0 - 1e-6], np.linspace(-2, 2, 58)]),
    "repeats": np.concatenate([[100.0, 99.999, 50.0, 50.0, 50.0], np.linspace(-3, 3, 40),
                               [-20.0, -20.0 + 1e-4, 0.0, 0.0, 0.0, 0.0]]),
}


def test_a_repeated_top_eigenvalue_is_found_with_default_arguments():
    op, a = operator(REPEATED_TOP)
    eig = ls.eigenvalues(op, k=3, key=KEY)
    np.testing.assert_allclose(eig.values, [6.0, 6.0, 6.0], rtol=TOL)
    assert bool(eig.checked) and np.all(eig.converged)
    vecs = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(eig.vectors))
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(3), atol=1e-8)  # three copies
    true_res = np.linalg.norm(vecs @ a - eig.values[:, None] * vecs, axis=1)
    np.testing.assert_allclose(eig.residuals, true_res, rtol=1e-6, atol=1e-12)
    # The fixed-step path cannot see the copies, and says so.
    fixed = ls.eigenvalues(op, k=3, key=KEY, num_steps=33)
    assert fixed.values[1] < 5.5 and not bool(fixed.checked)


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
@pytest.mark.parametrize("name", [n if n != "negatives" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in SPECTRA])
def test_designed_spectra_meet_tol_when_stopping_early(name, which):
    spectrum = SPECTRA[name]
    op, a = operator(spectrum, seed=1)
    k = 2
    wanted = 2 * k if which == "both" else k
    eig = ls.eigenvalues(op, k=k, key=KEY, which=which)
    ref = reference(spectrum, k, which)
    scale = np.abs(ref)
    vecs = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(eig.vectors))
    true_res = np.linalg.norm(vecs @ a - eig.values[:, None] * vecs, axis=1)
    np.testing.assert_allclose(eig.residuals, true_res, rtol=1e-6, atol=1e-12)
    if int(eig.num_matvecs) < fixed_default(len(spectrum), wanted) or np.all(eig.converged):
        # Stopped early: Weyl puts each value within its residual of the reference.
        np.testing.assert_array_less(np.abs(eig.values - ref), TOL * scale + 1e-12)
        # Never stops with a true residual more than 10x above tol·|λ|.
        np.testing.assert_array_less(true_res, 10 * TOL * np.abs(eig.values) + 1e-12)
    # Without the check the run never exceeds the fixed-step default, and its pairs
    # still meet tol; but it can stop at [10, 5] on "clusters" (10 and 9.99 are closer
    # than the residual tol·|λ| resolves), which is what the check is for.
    plain = ls.eigenvalues(op, k=k, key=KEY, which=which, check=False)
    assert int(plain.num_matvecs) <= fixed_default(len(spectrum), wanted)
    assert np.all(plain.residuals <= 10 * TOL * np.abs(plain.values))
    if name in ("clusters", "negatives", "tiny gap"):  # nothing repeated: one check
        assert int(eig.num_matvecs) <= 2 * fixed_default(len(spectrum), wanted)


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_k1_stops_early_without_a_check(which):
    op, a = operator(SPECTRA["clusters"], seed=2)
    counted, count = counting(op)
    eig = ls.eigenvalues(counted, k=1, key=KEY, which=which)
    jax.block_until_ready(eig.values)
    assert count[0] == int(eig.num_matvecs)  # products counted independently
    assert int(eig.num_matvecs) < fixed_default(60, 2 if which == "both" else 1)
    ref = reference(SPECTRA["clusters"], 1, which)
    np.testing.assert_array_less(np.abs(eig.values - ref), TOL * np.abs(ref))
    assert bool(eig.checked)  # one copy of each eigenvalue is all k=1 needs


def test_num_matvecs_counts_every_product_including_checks():
    op, _ = operator(REPEATED_TOP, seed=3)
    counted, count = counting(op)
    eig = ls.eigenvalues(counted, k=2, key=KEY)
    jax.block_until_ready(eig.values)
    assert count[0] == int(eig.num_matvecs)
    np.testing.assert_allclose(eig.values, [6.0, 6.0], rtol=TOL)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("which", ["top", "both"])
def test_residuals_are_those_of_the_returned_pairs(which, keep, monkeypatch):
    """Without checks (k=1) the run keeps its products and forms A·y from them (no
    product more) unless they would take too much memory: either way the residuals are
    ‖A y − θ y‖ of the returned pairs, against numpy in float64, and the products
    counted on the host equal `num_matvecs`."""
    from landscape import spectrum
    op, a = operator(SPECTRA["clusters"], seed=6)
    kept = ls.eigenvalues(op, k=1, key=KEY, which=which)   # the default: kept
    if not keep:
        monkeypatch.setattr(spectrum, "_PRODUCT_BYTES", 0)
    counted, count = counting(op)
    eig = ls.eigenvalues(counted, k=1, key=KEY, which=which)
    jax.block_until_ready(eig.values)
    wanted = 2 if which == "both" else 1
    assert count[0] == int(eig.num_matvecs)
    y = np.asarray(eig.vectors)
    want = np.linalg.norm(y @ a - np.asarray(eig.values)[:, None] * y, axis=1)
    np.testing.assert_allclose(eig.residuals, want, rtol=1e-6, atol=1e-13)
    np.testing.assert_allclose(eig.values, kept.values, rtol=1e-12)
    assert int(eig.num_matvecs) == int(kept.num_matvecs) + (0 if keep else wanted)


def test_fixed_num_steps_is_the_plain_lanczos_run():
    op, _ = operator(SPECTRA["clusters"], seed=4)
    eig = ls.eigenvalues(op, k=3, key=KEY, num_steps=20)
    mv, flat = op.flat_matvec()
    k_start, k_restart = jax.random.split(KEY)
    v0 = jax.random.normal(k_start, flat.shape, flat.dtype)
    alphas, betas, _ = ls.lanczos(mv, v0, 20, k_restart)
    t = np.diag(alphas) + np.diag(betas[:-1], 1) + np.diag(betas[:-1], -1)
    np.testing.assert_allclose(eig.values, np.linalg.eigvalsh(t)[::-1][:3], rtol=1e-12)
    assert int(eig.num_matvecs) == 23 and not bool(eig.checked)


@pytest.mark.slow
def test_tight_tol_matches_eigvalsh_and_the_mlp_hessian():
    params = m.mlp_params(jax.random.key(1), sizes=(4, 8, 3))
    batch = m.classification_data(jax.random.key(2), n=32, d=4, classes=3)
    op = ls.hessian(m.ce_loss, params, batch)
    ref = np.linalg.eigvalsh(np.asarray(m.dense_hessian(m.ce_loss, params, batch)))
    eig = ls.eigenvalues(op, k=2, key=KEY, which="both", tol=1e-8)
    np.testing.assert_allclose(eig.values, [ref[-1], ref[-2], ref[1], ref[0]], rtol=1e-6)


def test_adaptive_under_jit_and_vmap():
    op, _ = operator(SPECTRA["tiny gap"], seed=5)
    keys = jax.random.split(KEY, 3)
    batched = jax.jit(jax.vmap(lambda key: ls.eigenvalues(op, k=2, key=key).values))(keys)
    for i in range(3):
        np.testing.assert_allclose(batched[i], ls.eigenvalues(op, k=2, key=keys[i]).values,
                                   rtol=1e-10)


def _training_points(num_points=6, sgd_steps=3):
    params = m.mlp_params(jax.random.key(3), sizes=(5, 10, 3))
    batch = m.classification_data(jax.random.key(4), n=48, d=5, classes=3)
    opt = optax.sgd(0.1)
    state = opt.init(params)
    points = []
    for _ in range(num_points):
        points.append(params)
        for _ in range(sgd_steps):
            g = jax.grad(m.ce_loss)(params, batch)
            updates, state = opt.update(g, state)
            params = optax.apply_updates(params, updates)
    return points, batch


@pytest.mark.parametrize("k", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_warm_started_tracking_equals_cold_starts_with_fewer_products(k):
    points, batch = _training_points()
    cold_total = warm_total = 0
    previous = None
    for i, params in enumerate(points):
        op = ls.hessian(m.ce_loss, params, batch)
        key = jax.random.fold_in(KEY, i)
        cold = ls.eigenvalues(op, k=k, key=key)
        warm = ls.eigenvalues(op, k=k, key=key, init=previous)
        ref = np.linalg.eigvalsh(np.asarray(m.dense_hessian(m.ce_loss, params, batch)))
        ref = ref[::-1][:k]
        np.testing.assert_array_less(np.abs(cold.values - ref), TOL * np.abs(ref))
        np.testing.assert_array_less(np.abs(warm.values - ref), TOL * np.abs(ref))
        if previous is not None:  # the first warm call is a cold start
            cold_total += int(cold.num_matvecs)
            warm_total += int(warm.num_matvecs)
        previous = warm
    print(f"k={k}: warm/cold products {warm_total}/{cold_total} = "
          f"{warm_total / cold_total:.2f}")
    assert warm_total < cold_total


def test_bad_adaptive_arguments():
    op, _ = operator(SPECTRA["clusters"])
    eig = ls.eigenvalues(op, k=1, key=KEY)
    with pytest.raises(ValueError, match="init"):
        ls.eigenvalues(op, k=1, key=KEY, init=np.ones(60))
    with pytest.raises(ValueError, match="num_steps"):
        ls.eigenvalues(op, k=1, key=KEY, num_steps=10, init=eig)
    with pytest.raises(ValueError, match="max_steps"):
        ls.eigenvalues(op, k=3, key=KEY, max_steps=2)
    with pytest.raises(ValueError, match="check"):
        ls.eigenvalues(op, k=2, key=KEY, check="yes")
    other, _ = operator(np.arange(10.0))
    with pytest.raises(ValueError, match="init"):
        ls.eigenvalues(other, k=1, key=KEY, init=eig)


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_operator_gradient_is_the_loss_gradient(kind):
    """`op.gradient()` (chunked, plain and prepared) against jax.grad of the mean loss."""
    params = m.mlp_params(jax.random.key(5), sizes=(4, 6, 3))
    batch = m.classification_data(jax.random.key(6), n=30, d=4, classes=3)
    op = {"hessian": lambda: ls.hessian(m.ce_loss, params, batch, chunk_size=10),
          "ggn": lambda: ls.ggn(m.mlp_apply, params, batch, chunk_size=10),
          "fisher": lambda: ls.fisher(m.mlp_apply, params, batch, key=KEY, chunk_size=10),
          }[kind]()
    ref = ravel_pytree(jax.grad(m.ce_loss)(params, batch))[0]
    for mode in ("plain", "linearize"):
        got = jax.jit(lambda o: ls.prepared(o, mode).gradient())(op)
        np.testing.assert_allclose(ravel_pytree(got)[0], ref, rtol=1e-10, atol=1e-13)
    block = ls.restrict(op, lambda path, leaf: path.startswith("layer1/"))
    np.testing.assert_allclose(ravel_pytree(block.gradient())[0],
                               ravel_pytree(jax.grad(m.ce_loss)(params, batch)["layer1"])[0],
                               rtol=1e-10)


def _quadratic(spectrum, offset):
    """Loss ½ (θ − θ*)ᵀ A (θ − θ*) with θ − θ* = `offset`: gradient A·offset."""
    _, a = operator(spectrum, seed=3)
    aj = jnp.asarray(a)
    star = -jnp.asarray(offset)
    return ls.hessian(lambda p, _: 0.5 * (p - star) @ aj @ (p - star), jnp.zeros(len(a)),
                      jnp.zeros((1, 1))), a


@pytest.mark.parametrize("which", ["top", "bottom", "both"])
def test_gradient_start_at_a_critical_point_and_away_from_it(which):
    """Cold starts mix in the loss gradient (top end): at a critical point (zero
    gradient) and away from it the values still meet `tol` against numpy.linalg, and
    along the gradient of a top-heavy quadratic Lanczos needs fewer products."""
    spectrum = SPECTRA["clusters"]
    for offset in (np.zeros(60), np.random.default_rng(0).normal(size=60)):
        op, a = _quadratic(spectrum, offset)
        eig = ls.eigenvalues(op, k=2, key=KEY, which=which)
        ref = reference(np.linalg.eigvalsh(a), 2, which)
        assert np.all(np.isfinite(eig.values))
        np.testing.assert_array_less(np.abs(eig.values - ref), TOL * np.abs(ref) + 1e-12)
    if which == "top":
        _, a = operator(spectrum, seed=3)
        top = np.linalg.eigh(a)[1][:, -1]
        along, _ = _quadratic(spectrum, top / spectrum.max())   # gradient = top vector
        lin = ls.LinearOperator(lambda v: jnp.asarray(a) @ v, jnp.zeros(60))
        assert (int(ls.eigenvalues(along, k=1, key=KEY).num_matvecs)
                < int(ls.eigenvalues(lin, k=1, key=KEY).num_matvecs))
