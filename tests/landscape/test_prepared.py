"""Prepared operators (one linearization, many products) against the plain products,
and probe blocks in `trace` / `diagonal` against probe-at-a-time (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import landscape as ls
from experiments.models import CNN1D, pure
from landscape.operators import PreparedOperator, prepared, product_bytes
from landscape.trace import block_size_for
from tests.landscape import models as m

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def setup():
    params = m.mlp_params(jax.random.key(1))
    x, y = m.classification_data(jax.random.key(2))
    return params, (x, y)


def _vectors(params, k, seed=3):
    flat, unravel = ravel_pytree(params)
    return jax.vmap(unravel)(jax.random.normal(jax.random.key(seed), (k, flat.size)))


@jax.jit
def _both(op, vs):
    """Plain and linearized products of each `vs[i]`, inside one jitted routine as the
    spectrum and trace routines use them."""
    lin = prepared(op, "linearize")
    return jax.lax.map(op.matvec, vs), jax.lax.map(lin.matvec, vs), lin.matmat(vs)


def _assert_same(op):
    vs = _vectors(op.params, 3)
    plain, lin, mm = _both(op, vs)
    plain, lin, mm = (ravel_pytree(t)[0] for t in (plain, lin, mm))
    assert np.abs(plain).max() > 1e-3
    np.testing.assert_allclose(lin, plain, rtol=0, atol=1e-10)
    np.testing.assert_allclose(mm, plain, rtol=0, atol=1e-10)


def _operators(params, batch):
    x, y = batch
    y_mse = jax.random.normal(jax.random.key(5), (x.shape[0], 3))
    return {
        "hessian": ls.hessian(m.ce_loss, params, batch),
        "hessian chunked": ls.hessian(m.ce_loss, params, batch, chunk_size=10),
        "ggn": ls.ggn(m.mlp_apply, params, batch),
        "ggn chunked": ls.ggn(m.mlp_apply, params, batch, chunk_size=10),
        "ggn mse chunked": ls.ggn(m.mlp_apply, params, (x, y_mse), loss="mse",
                                  chunk_size=8),
        "ggn callable loss": ls.ggn(m.mlp_apply, params, batch, chunk_size=10, loss=lambda
                                    z, t: jax.nn.logsumexp(z) - z[t]),
        "fisher empirical": ls.fisher(m.mlp_apply, params, batch, kind="empirical",
                                      chunk_size=10),
        "fisher true": ls.fisher(m.mlp_apply, params, batch, kind="true", key=KEY,
                                 num_samples=2, chunk_size=10),
    }


@pytest.mark.parametrize("name", ["hessian", "hessian chunked", "ggn", "ggn chunked",
                                  "ggn mse chunked", "ggn callable loss",
                                  "fisher empirical", "fisher true"])
def test_linearized_products_equal_plain_products(setup, name):
    _assert_same(_operators(*setup)[name])


def test_linearized_products_of_a_batchnorm_model_in_train_mode():
    model = CNN1D(3, channels=(3, 4), kernel_size=3, batch_norm=True, rngs=nnx.Rngs(0))
    train_fn, params = pure(model, "train")
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x = jax.random.normal(jax.random.key(2), (12, 8)) + 0.5
    y = jax.random.randint(jax.random.key(3), (12,), 0, 3)
    loss_fn = lambda p, b: ls.cross_entropy(train_fn(p, b[0]), b[1])
    # Chunks of 5 leave a remainder of 2: each chunk keeps its own batch statistics.
    _assert_same(ls.hessian(loss_fn, params, (x, y), chunk_size=5))


def test_a_restricted_block_is_prepared_through_its_inner_operator(setup):
    params, batch = setup
    block = ls.restrict(ls.hessian(m.ce_loss, params, batch, chunk_size=10),
                        lambda path, leaf: path.startswith("layer0"))
    assert isinstance(prepared(block, "linearize").op, PreparedOperator)
    _assert_same(block)


def test_auto_mode_falls_back_to_plain_when_the_residuals_exceed_the_budget(setup):
    params, batch = setup
    H = ls.hessian(m.ce_loss, params, batch, chunk_size=10)
    need = product_bytes(H)
    # The residuals hold at least the hidden activations of every example.
    assert need >= batch[0].shape[0] * 8 * 8
    assert prepared(H, budget=need - 1) is H
    assert isinstance(prepared(H, budget=need), PreparedOperator)
    assert isinstance(prepared(H), PreparedOperator)          # default budget: fits
    assert prepared(H, "plain") is H
    assert isinstance(prepared(H, "linearize", budget=1), PreparedOperator)
    assert H.prepare(budget=1) is H
    user = ls.LinearOperator(lambda v: 2.0 * v, jnp.zeros(3))
    assert prepared(user, "linearize") is user
    with pytest.raises(ValueError, match="mode"):
        prepared(H, "fast")


def test_memory_helpers():
    tree = {"a": jnp.zeros((3, 4)), "b": jax.ShapeDtypeStruct((5,), jnp.float32)}
    assert ls.memory.tree_bytes(tree) == 3 * 4 * 8 + 5 * 4
    total = ls.memory.default_budget(1.0)
    assert 0 < ls.memory.default_budget() <= total
    with pytest.raises(ValueError, match="fraction"):
        ls.memory.default_budget(0.0)


# ------------------------------------------------------------------ probe blocks ---

@pytest.mark.parametrize("method", [pytest.param("hutchinson", marks=pytest.mark.slow), "hutch++"])
def test_trace_in_probe_blocks_equals_probe_at_a_time(setup, method):
    params, batch = setup
    H = ls.hessian(m.ce_loss, params, batch)
    dense = np.trace(np.asarray(H.dense()))
    one = ls.trace(H, key=KEY, num_probes=30, method=method, block_size=1, mode="plain")
    for block, mode in ((7, "plain"), (30, "linearize")):
        got = ls.trace(H, key=KEY, num_probes=30, method=method, block_size=block,
                       mode=mode)
        np.testing.assert_allclose(got.value, one.value, rtol=1e-12, atol=1e-10)
        np.testing.assert_allclose(got.std_error, one.std_error, rtol=1e-10, atol=1e-12)
    assert abs(float(one.value) - dense) < 4 * float(one.std_error) + 1e-8
    tiny = ls.trace(H, key=KEY, num_probes=30, method=method, block_size=5, budget=1)
    np.testing.assert_allclose(tiny.value, one.value, rtol=1e-12, atol=1e-10)


def test_diagonal_in_probe_blocks_equals_probe_at_a_time(setup):
    params, batch = setup
    G = ls.ggn(m.mlp_apply, params, batch, chunk_size=10)
    one = ls.diagonal(G, key=KEY, num_probes=20, block_size=1, mode="plain")
    got = ls.diagonal(G, key=KEY, num_probes=20, block_size=6, mode="linearize")
    for a, b in ((one.value, got.value), (one.std_error, got.std_error)):
        np.testing.assert_allclose(ravel_pytree(b)[0], ravel_pytree(a)[0], rtol=0,
                                   atol=1e-10)
    # Against the dense diagonal: the probe mean is unbiased.
    err = ravel_pytree(one.value)[0] - np.diag(np.asarray(G.dense()))
    assert np.all(np.abs(err) <= 5 * ravel_pytree(one.std_error)[0] + 1e-10)


def test_block_size_rules_and_bad_input(setup):
    params, batch = setup
    H = ls.hessian(m.ce_loss, params, batch)
    assert block_size_for(H, 50, 8) == 8
    assert block_size_for(H, 5, 8) == 5
    assert block_size_for(H, 50, budget=3 * product_bytes(H)) == 3
    assert block_size_for(H, 50, budget=1) == 1
    with pytest.raises(ValueError, match="block_size"):
        ls.trace(H, key=KEY, block_size=0)
    with pytest.raises(ValueError, match="mode"):
        ls.diagonal(H, key=KEY, mode="fast")
    with pytest.raises(ValueError, match="budget"):
        ls.trace(H, key=KEY, budget=-1)


# ------------------------------------------- spectra prepare by default (mode="auto") ---

@pytest.mark.parametrize("kind", ["hessian", pytest.param("ggn chunked", marks=pytest.mark.slow)])
def test_spectra_prepared_and_plain_agree(setup, kind):
    op = _operators(*setup)[kind]
    dense = np.linalg.eigvalsh(np.asarray(op.dense()))
    runs = {mode: ls.eigenvalues(op, k=3, key=KEY, tol=1e-8, mode=mode)
            for mode in ("plain", "linearize", "auto")}
    for mode in ("linearize", "auto"):
        np.testing.assert_allclose(runs[mode].values, runs["plain"].values, rtol=1e-10)
        assert int(runs[mode].num_matvecs) == int(runs["plain"].num_matvecs)
    np.testing.assert_allclose(runs["plain"].values, dense[::-1][:3], rtol=1e-7)
    # A budget too small for the residuals falls back to plain products: same values.
    tiny = ls.eigenvalues(op, k=3, key=KEY, tol=1e-8, budget=1)
    np.testing.assert_allclose(tiny.values, runs["plain"].values, rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hessian", "ggn chunked"])
def test_fixed_steps_power_and_density_prepared_and_plain_agree(setup, kind):
    op = _operators(*setup)[kind]
    fixed = [ls.eigenvalues(op, k=2, key=KEY, num_steps=20, mode=mode).values
             for mode in ("plain", "linearize")]
    np.testing.assert_allclose(fixed[1], fixed[0], rtol=1e-10)
    power = [ls.eigenvalues(op, key=KEY, method="power", tol=1e-6, mode=mode).values
             for mode in ("plain", "linearize")]
    np.testing.assert_allclose(power[1], power[0], rtol=1e-10)
    den = [ls.density(op, key=KEY, num_probes=3, num_steps=12, mode=mode)
           for mode in ("plain", "linearize")]
    np.testing.assert_allclose(den[1].nodes, den[0].nodes, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(den[1].weights, den[0].weights, rtol=1e-9, atol=1e-10)


def test_spectra_reject_bad_mode_and_budget(setup):
    H = _operators(*setup)["hessian"]
    assert ls.prepared is prepared
    with pytest.raises(ValueError, match="mode"):
        ls.eigenvalues(H, key=KEY, mode="fast")
    with pytest.raises(ValueError, match="budget"):
        ls.density(H, key=KEY, budget=0)
