"""ls.block_heterogeneity (JS⁰) against scipy's Jensen–Shannon distance."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

import landscape as ls
from tests.landscape import models as m


def _density(nodes, weights):
    nodes, weights = jnp.asarray(nodes, float), jnp.asarray(weights, float)
    return ls.Density(nodes, weights, jnp.zeros(1), jnp.zeros(1), jnp.asarray(0.1))


def _numpy_probabilities(dens, grid, sigma):
    """Each density smoothed by a Gaussian of width sigma on grid, written plainly."""
    out = []
    for d in dens:
        nodes, weights = np.asarray(d.nodes), np.asarray(d.weights)
        g = np.zeros_like(grid)
        for row_n, row_w in zip(nodes, weights):
            for x, w in zip(row_n, row_w):
                g += w * np.exp(-0.5 * ((grid - x) / sigma) ** 2)
        out.append(g / g.sum())
    return np.array(out)


DENS = {
    "bulk": _density([[0.0, 0.1, 0.2], [0.05, 0.1, 0.15]], [[0.5, 0.3, 0.2], [0.2, 0.6, 0.2]]),
    "outliers": _density([[0.0, 2.0, 5.0], [0.1, 3.0, 5.0]], [[0.8, 0.1, 0.1], [0.7, 0.2, 0.1]]),
    "negative": _density([[-1.0, 0.0, 1.0], [-0.5, 0.0, 0.5]], [[0.3, 0.4, 0.3]] * 2),
}


def test_js0_matches_scipy_on_the_same_discretized_densities():
    het = ls.block_heterogeneity(DENS, num_points=400)
    grid, sigma = np.asarray(het.grid), float(het.sigma)
    # The documented defaults: one grid over every block's nodes, σ = 1% of the range.
    np.testing.assert_allclose(sigma, 0.01 * 6.0)
    np.testing.assert_allclose([grid[0], grid[-1]], [-1 - 5 * sigma, 5 + 5 * sigma])
    probs = _numpy_probabilities(DENS.values(), grid, sigma)
    np.testing.assert_allclose(het.probabilities, probs, rtol=1e-10, atol=1e-300)
    want = {(i, j): jensenshannon(probs[i], probs[j]) for i, j in
            itertools.combinations(range(3), 2)}
    for (i, j), d in want.items():
        np.testing.assert_allclose(het.distances[i, j], d, rtol=1e-8)
        np.testing.assert_allclose(het.distances[j, i], d, rtol=1e-8)
    np.testing.assert_allclose(het.js0, np.mean(list(want.values())), rtol=1e-8)
    assert het.names == ("bulk", "outliers", "negative")
    np.testing.assert_array_equal(np.diag(het.distances), 0.0)


def test_extremes_and_a_given_grid():
    same = ls.block_heterogeneity([DENS["bulk"], DENS["bulk"]])
    np.testing.assert_allclose(same.js0, 0.0, atol=1e-7)
    # Two spikes far apart on a grid where they do not overlap: the largest distance.
    far = [_density([[0.0]], [[1.0]]), _density([[100.0]], [[1.0]])]
    het = ls.block_heterogeneity(far, grid=jnp.linspace(-5, 105, 1101), sigma=1.0)
    np.testing.assert_allclose(het.js0, np.sqrt(np.log(2)), rtol=1e-10)
    probs = np.asarray(het.probabilities)
    np.testing.assert_allclose(het.js0, jensenshannon(probs[0], probs[1]), rtol=1e-8)


def test_reads_block_reports():
    z = jnp.zeros(1)
    rep = {name: ls.BlockReport(3, z, z, z, z, z, d) for name, d in DENS.items()}
    np.testing.assert_allclose(ls.block_heterogeneity(rep).js0,
                               ls.block_heterogeneity(list(DENS.values())).js0, rtol=1e-12)


@pytest.mark.slow
def test_from_a_per_block_report():
    params = m.mlp_params(jax.random.key(1), sizes=(5, 6, 3))
    H = ls.hessian(m.ce_loss, params, m.classification_data(jax.random.key(2)))
    rep = ls.per_block(H, key=jax.random.key(0), density=True, density_probes=2,
                       density_steps=10, trace_probes=10)
    het = ls.block_heterogeneity(rep)
    assert het.names == tuple(rep)
    dens = [r.density for r in rep.values()]
    probs = _numpy_probabilities(dens, np.asarray(het.grid), float(het.sigma))
    np.testing.assert_allclose(het.js0, jensenshannon(probs[0], probs[1]), rtol=1e-8)
    assert 0 < float(het.js0) < np.sqrt(np.log(2))


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="at least two"):
        ls.block_heterogeneity([DENS["bulk"]])
    with pytest.raises(ValueError, match="density=True"):
        ls.block_heterogeneity({"a": DENS["bulk"], "b": "nothing"})
    with pytest.raises(ValueError, match="sigma"):
        ls.block_heterogeneity(DENS, sigma=0.0)
    with pytest.raises(ValueError, match="grid"):
        ls.block_heterogeneity(DENS, grid=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="report_or_densities"):
        ls.block_heterogeneity(DENS["bulk"])


def test_float32_tails_stay_finite():
    # Far tails of a float32 Gaussian are subnormal, where half of p underflows to 0.
    dens = [ls.Density(jnp.asarray(d.nodes, jnp.float32), jnp.asarray(d.weights, jnp.float32),
                       jnp.zeros(1, jnp.float32), jnp.zeros(1, jnp.float32),
                       jnp.asarray(0.1, jnp.float32)) for d in DENS.values()]
    het = ls.block_heterogeneity(dens, sigma=0.02)
    probs = np.asarray(het.probabilities, np.float64)
    assert np.all(np.isfinite(het.distances))
    want = np.mean([jensenshannon(probs[i], probs[j])
                    for i, j in itertools.combinations(range(3), 2)])
    np.testing.assert_allclose(het.js0, want, rtol=1e-4)
