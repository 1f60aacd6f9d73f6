"""Directions and surfaces against per-point evaluation written plainly, numpy norms
and numpy's SVD."""

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
    params = m.mlp_params(jax.random.key(1), sizes=(5, 8, 3))
    train = m.classification_data(jax.random.key(2), n=23)
    test = m.classification_data(jax.random.key(3), n=11)
    return params, train, test


def acc(p, batch):
    return ls.accuracy(m.mlp_apply(p, batch[0]), batch[1])


def shifted(params, coeffs, dirs):
    return jax.tree.map(lambda p, *ds: p + sum(c * d for c, d in zip(coeffs, ds)),
                        params, *dirs)


# ------------------------------------------------------------------ directions ---

def test_filter_normalized_direction_has_the_weights_filter_norms():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(1), (6, 4)),
                        "bias": jnp.arange(4.0)},
              "conv": {"kernel": jax.random.normal(jax.random.key(2), (3, 3, 2, 5))}}
    d = ls.filter_normalized_direction(KEY, params)
    for name in ("dense", "conv"):
        w, dw = np.asarray(params[name]["kernel"]), np.asarray(d[name]["kernel"])
        for f in range(w.shape[-1]):  # one filter = one output unit / channel
            np.testing.assert_allclose(np.linalg.norm(dw[..., f]),
                                       np.linalg.norm(w[..., f]), rtol=1e-10)
    np.testing.assert_array_equal(d["dense"]["bias"], 0.0)
    # The direction is the random one, rescaled filter by filter.
    raw = ls.random_direction(KEY, params)
    r, dw = np.asarray(raw["dense"]["kernel"]), np.asarray(d["dense"]["kernel"])
    np.testing.assert_allclose(dw / r, np.broadcast_to((dw / r)[:1], dw.shape), rtol=1e-10)

    kept = ls.filter_normalized_direction(KEY, params, zero_bias=False)
    np.testing.assert_allclose(np.linalg.norm(kept["dense"]["bias"]),
                               np.linalg.norm(params["dense"]["bias"]), rtol=1e-10)
    torch_layout = ls.filter_normalized_direction(KEY, params, filter_axis=0)
    w, dw = np.asarray(params["conv"]["kernel"]), np.asarray(torch_layout["conv"]["kernel"])
    for f in range(w.shape[0]):
        np.testing.assert_allclose(np.linalg.norm(dw[f]), np.linalg.norm(w[f]), rtol=1e-10)


def test_pca_directions_match_numpy_svd_and_recover_the_plane():
    rng = np.random.default_rng(0)
    params = m.mlp_params(jax.random.key(1), sizes=(4, 5, 2))
    flat, unravel = ravel_pytree(params)
    basis = np.linalg.qr(rng.normal(size=(flat.size, 2)))[0]
    t = np.linspace(0, 1, 15)
    path = np.stack([3 * np.cos(2 * t), np.sin(3 * t)], 1) @ basis.T + 1e-4 * rng.normal(
        size=(15, flat.size))
    traj = jax.vmap(unravel)(jnp.asarray(flat + path))
    pca = ls.pca_directions(traj, k=2)
    vecs = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(pca.directions))
    offsets = path - path[-1]
    _, s, vt = np.linalg.svd(offsets - offsets.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(vecs @ vt[:2].T), np.eye(2), atol=1e-8)
    np.testing.assert_allclose(pca.explained_variance_ratio, s[:2] ** 2 / np.sum(s**2),
                               rtol=1e-8)
    np.testing.assert_allclose(pca.coordinates, offsets @ vecs.T, atol=1e-12)
    np.testing.assert_allclose(pca.coordinates[-1], 0.0, atol=1e-12)
    # Two components carry (nearly) the whole path: it reconstructs from its coordinates.
    np.testing.assert_allclose(pca.coordinates @ vecs, offsets, atol=1e-3)
    with pytest.raises(ValueError, match="k"):
        ls.pca_directions(traj, k=15)


# -------------------------------------------------------------------- surfaces ---

def test_surface_1d_matches_plain_evaluation_and_equals_the_loss_at_the_origin(setup):
    params, train, test = setup
    d = ls.filter_normalized_direction(KEY, params)
    alphas = jnp.linspace(-1.0, 1.0, 11)
    c = ls.surface_1d(m.ce_loss, params, d, train, alphas=alphas, metric_fn=acc,
                      test_batch=test, chunk_size=5, points_per_chunk=4)
    np.testing.assert_allclose(c.train_loss[5], m.ce_loss(params, train), rtol=1e-12)
    for i, a in enumerate(np.asarray(alphas)):
        p = shifted(params, [a], [d])
        np.testing.assert_allclose(c.train_loss[i], m.ce_loss(p, train), rtol=1e-10)
        np.testing.assert_allclose(c.test_loss[i], m.ce_loss(p, test), rtol=1e-10)
        np.testing.assert_allclose(c.train_metric[i], acc(p, train), rtol=1e-6)  # float32
        np.testing.assert_allclose(c.test_metric[i], acc(p, test), rtol=1e-6)


def test_surface_2d_matches_plain_evaluation_in_ij_order(setup):
    params, train, _ = setup
    k1, k2 = jax.random.split(KEY)
    dx = ls.filter_normalized_direction(k1, params)
    dy = ls.filter_normalized_direction(k2, params)
    xs, ys = jnp.linspace(-1.0, 1.0, 5), jnp.linspace(-0.5, 0.5, 3)
    s = ls.surface_2d(m.ce_loss, params, (dx, dy), train, xs=xs, ys=ys, chunk_size=10,
                      points_per_chunk=4)
    assert s.train_loss.shape == (5, 3) and s.test_loss is None and s.train_metric is None
    np.testing.assert_allclose(s.train_loss[2, 1], m.ce_loss(params, train), rtol=1e-12)
    for i, x in enumerate(np.asarray(xs)):
        for j, y in enumerate(np.asarray(ys)):
            ref = m.ce_loss(shifted(params, [x, y], [dx, dy]), train)
            np.testing.assert_allclose(s.train_loss[i, j], ref, rtol=1e-10)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), dx, dy)
    s2 = ls.surface_2d(m.ce_loss, params, stacked, train, xs=xs, ys=ys)
    np.testing.assert_allclose(s2.train_loss, s.train_loss, rtol=1e-10)


def test_interpolation_endpoints_equal_the_two_losses(setup):
    params, train, test = setup
    other = m.mlp_params(jax.random.key(9), sizes=(5, 8, 3))
    c = ls.interpolate(m.ce_loss, params, other, train, alphas=jnp.array([0.0, 0.3, 1.0, 1.5]),
                       test_batch=test, chunk_size=6)
    np.testing.assert_allclose(c.train_loss[0], m.ce_loss(params, train), rtol=1e-12)
    np.testing.assert_allclose(c.train_loss[2], m.ce_loss(other, train), rtol=1e-12)
    np.testing.assert_allclose(c.test_loss[2], m.ce_loss(other, test), rtol=1e-12)
    mid = jax.tree.map(lambda a, b: 0.7 * a + 0.3 * b, params, other)
    np.testing.assert_allclose(c.train_loss[1], m.ce_loss(mid, train), rtol=1e-10)
    far = jax.tree.map(lambda a, b: -0.5 * a + 1.5 * b, params, other)
    np.testing.assert_allclose(c.train_loss[3], m.ce_loss(far, train), rtol=1e-10)


def test_surfaces_run_under_jit(setup):
    params, train, _ = setup
    d = ls.random_direction(KEY, params)
    f = jax.jit(lambda p: ls.surface_1d(m.ce_loss, p, d, train,
                                        alphas=jnp.array([0.0, 0.5])).train_loss)
    np.testing.assert_allclose(f(params)[0], m.ce_loss(params, train), rtol=1e-12)


# ------------------------------------------------------------------- bad input ---

def test_bad_surface_inputs(setup):
    params, train, test = setup
    d = ls.random_direction(KEY, params)
    wrong = {"layer0": d["layer0"]}
    with pytest.raises(ValueError, match="direction"):
        ls.surface_1d(m.ce_loss, params, wrong, train)
    misshapen = jax.tree.map(lambda x: x[..., :1], d)
    with pytest.raises(ValueError, match="shape"):
        ls.surface_1d(m.ce_loss, params, misshapen, train)
    with pytest.raises(ValueError, match="directions"):
        ls.surface_2d(m.ce_loss, params, (d,), train)
    with pytest.raises(ValueError, match="xs"):
        ls.surface_2d(m.ce_loss, params, (d, d), train, xs=jnp.zeros(0))
    with pytest.raises(ValueError, match="alphas"):
        ls.surface_1d(m.ce_loss, params, d, train, alphas=jnp.zeros((2, 2)))
    with pytest.raises(ValueError, match="points_per_chunk"):
        ls.surface_1d(m.ce_loss, params, d, train, points_per_chunk=0)
    with pytest.raises(ValueError, match="scalar"):
        ls.surface_1d(lambda p, b: m.mlp_apply(p, b[0]), params, d, train)
    with pytest.raises(ValueError, match="test_batch"):
        ls.surface_1d(m.ce_loss, params, d, train, test_batch=test[0])
    with pytest.raises(ValueError, match="params_b"):
        ls.interpolate(m.ce_loss, params, wrong, train)
    with pytest.raises(ValueError, match="direction"):
        ls.filter_normalize(wrong, params)
