"""ls.per_block against the blocks of a dense float64 Hessian."""

import jax
import numpy as np
import pytest

import landscape as ls
from tests.landscape import models as m

KEY = jax.random.key(3)


@pytest.fixture(scope="module")
def setup():
    params = m.mlp_params(jax.random.key(1), sizes=(5, 8, 3))  # 75 parameters
    batch = m.classification_data(jax.random.key(2))
    H = ls.hessian(m.ce_loss, params, batch)
    return params, H, np.asarray(m.dense_hessian(m.ce_loss, params, batch))


def _indices(params, select):
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    out, start = [], 0
    for path, leaf in leaves:
        if select(ls.path_name(path), leaf):
            out.extend(range(start, start + leaf.size))
        start += leaf.size
    return np.array(out)


# One configuration for every call, so the compiled per-block routines are reused.
CFG = dict(key=KEY, k=2, num_steps=30, tol=1e-6, trace_probes=50)


def test_default_blocks_are_layers_with_exact_eigenvalues(setup):
    params, H, dense = setup
    rep = ls.per_block(H, **CFG)
    assert list(rep) == ["layer0", "layer1"]
    for name, r in rep.items():
        idx = _indices(params, lambda p, leaf: p.startswith(name + "/"))
        ref = np.linalg.eigvalsh(dense[np.ix_(idx, idx)])[::-1]
        assert r.size == len(idx)
        np.testing.assert_allclose(r.values, ref[:2], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(r.lambda_max, ref[0], rtol=1e-8)
        assert r.converged.all() and np.all(r.residuals < 1e-6 * abs(ref[0]))
        assert r.density is None
        # The estimate is within a few of its own standard errors of the block trace.
        true = np.trace(dense[np.ix_(idx, idx)])
        assert abs(float(r.trace) - true) < 4 * float(r.trace_std_error), name
    # Shared probes: the blocks' estimates add up to the full Hutchinson estimate with
    # the same probes, and the blocks partition the parameters.
    full = ls.trace(H, key=jax.random.split(KEY, 3)[1], num_probes=50, method="hutchinson")
    np.testing.assert_allclose(sum(float(r.trace) for r in rep.values()),
                               float(full.value), rtol=1e-10)
    assert sum(r.size for r in rep.values()) == dense.shape[0]
    # A grouping function that names the same layers gives the same report.
    same = ls.per_block(H, lambda path: "layer" + path[5], **CFG)
    for name in rep:
        np.testing.assert_allclose(same[name].values, rep[name].values, rtol=1e-12)
        np.testing.assert_allclose(same[name].trace, rep[name].trace, rtol=1e-12)


def test_shared_probe_variance_is_the_closed_form(setup):
    # One sample z_bᵀ(Hz)_b has variance 2(‖H_bb‖_F² − Σ H_ii²) + ‖H_b,rest‖_F².
    params, H, dense = setup
    p = 4000
    rep = ls.per_block(H, **{**CFG, "trace_probes": p})
    for name, r in rep.items():
        idx = _indices(params, lambda q, leaf: q.startswith(name + "/"))
        rest = np.setdiff1d(np.arange(dense.shape[0]), idx)
        hbb = dense[np.ix_(idx, idx)]
        var = 2 * (np.sum(hbb**2) - np.sum(np.diag(hbb) ** 2)) + np.sum(
            dense[np.ix_(idx, rest)] ** 2)
        np.testing.assert_allclose(float(r.trace_std_error) ** 2 * p, var, rtol=0.1)
        assert abs(float(r.trace) - np.trace(hbb)) < 4 * float(r.trace_std_error)


@pytest.mark.slow
def test_restricted_traces_and_densities(setup):
    params, H, dense = setup
    blocks = {"first": lambda p, _: p.startswith("layer0/"),
              "kernels": lambda p, _: p.endswith("/w")}  # blocks may overlap
    rep = ls.per_block(H, blocks, **CFG, trace_method="restricted", density=True,
                       density_probes=3, density_steps=60)
    for name, r in rep.items():
        idx = _indices(params, blocks[name])
        hbb = dense[np.ix_(idx, idx)]
        assert abs(float(r.trace) - np.trace(hbb)) <= 4 * float(r.trace_std_error) + 1e-8
        # With the Krylov space filled, every probe's nodes include the block's extremes.
        eig = np.linalg.eigvalsh(hbb)
        assert r.density.num_probes == 3 and r.density.num_steps == min(60, len(idx))
        np.testing.assert_allclose(r.density.nodes.max(1), eig[-1], rtol=1e-6)
        np.testing.assert_allclose(r.density.moments(1)[0], np.mean(eig),
                                   atol=4 * float(r.density.moments(1)[1]) + 1e-8)


def test_bad_blocks(setup):
    _, H, _ = setup
    with pytest.raises(ValueError, match="'none' of `blocks` selects no parameter"):
        ls.per_block(H, {"none": lambda p, _: False}, key=KEY)
    with pytest.raises(ValueError, match="blocks"):
        ls.per_block(H, {}, key=KEY)
    with pytest.raises(ValueError, match="blocks"):
        ls.per_block(H, ["layer0"], key=KEY)
    with pytest.raises(ValueError, match="trace_method"):
        ls.per_block(H, key=KEY, trace_method="exact")


@pytest.mark.parametrize("trace_method", ["shared", pytest.param("restricted", marks=pytest.mark.slow)])
def test_traces_with_linearized_products_in_probe_blocks_equal_plain(setup, trace_method):
    params, H, dense = setup
    plain = ls.per_block(H, trace_method=trace_method, mode="plain", block_size=1, **CFG)
    fast = ls.per_block(H, trace_method=trace_method, mode="linearize", block_size=7,
                        **CFG)
    for name in plain:
        np.testing.assert_allclose(fast[name].trace, plain[name].trace, rtol=1e-12,
                                   atol=1e-10)
        np.testing.assert_allclose(fast[name].trace_std_error, plain[name].trace_std_error,
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        ls.per_block(H, mode="fast", **CFG)
