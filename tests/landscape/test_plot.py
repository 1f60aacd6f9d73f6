"""Every plot renders to a PNG with labelled axes; Kendall's τ matches scipy."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
import scipy.stats

matplotlib.use("Agg")

import landscape as ls  # noqa: E402
from landscape import plot  # noqa: E402
from tests.landscape import models as m  # noqa: E402


@pytest.fixture(scope="module")
def results():
    params = m.mlp_params(jax.random.key(1), sizes=(5, 8, 3))
    train = m.classification_data(jax.random.key(2), n=40)
    test = m.classification_data(jax.random.key(3), n=20)

    def acc(p, b):
        return ls.accuracy(m.mlp_apply(p, b[0]), b[1])

    k1, k2 = jax.random.split(jax.random.key(0))
    dx = ls.filter_normalized_direction(k1, params)
    dy = ls.filter_normalized_direction(k2, params)
    curve = ls.surface_1d(m.ce_loss, params, dx, train, alphas=jnp.linspace(-1, 1, 21),
                          metric_fn=acc, test_batch=test)
    surf = ls.surface_2d(m.ce_loss, params, (dx, dy), train, xs=jnp.linspace(-1, 1, 9),
                         ys=jnp.linspace(-1, 1, 7), test_batch=test)
    den = ls.density(ls.hessian(m.ce_loss, params, train), key=jax.random.key(4),
                     num_probes=2, num_steps=20, num_points=200)
    return curve, surf, den


def labels_of(fig):
    return [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes]


def saved(fig, path):
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 5_000  # a real image, not an empty canvas
    return path


def test_curve(results, tmp_path):
    fig = plot.curve(results[0], xlabel="α along a filter-normalized direction")
    saved(fig, tmp_path / "curve.png")
    (x1, y1), (_, y2) = labels_of(fig)
    assert x1.startswith("α") and y1 == "loss" and y2 == "accuracy"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["train loss", "test loss", "train accuracy", "test accuracy"]


def test_contour_with_trajectory_and_3d_surface(results, tmp_path):
    surf = results[1]
    traj = np.stack([np.linspace(-0.8, 0, 10), 0.3 * np.sin(np.linspace(0, 3, 10))], 1)
    fig = plot.contour(surf, trajectory=traj, xlabel="PC 1", ylabel="PC 2")
    saved(fig, tmp_path / "contour.png")
    assert labels_of(fig)[0] == ("PC 1", "PC 2")
    assert fig.axes[1].get_ylabel() == "train loss"  # the colour bar
    fig = plot.contour(surf, which="test_loss", log=False)
    saved(fig, tmp_path / "contour_test.png")
    fig = plot.surface_3d(surf, log=True)
    saved(fig, tmp_path / "surface3d.png")
    assert fig.axes[0].get_zlabel() == "log10 train loss"


def test_density(results, tmp_path):
    fig = plot.density(results[2])
    saved(fig, tmp_path / "density.png")
    assert labels_of(fig)[0] == ("eigenvalue λ", "density (log)")


def test_sharpness_vs_gap_reports_kendall_tau(tmp_path):
    rng = np.random.default_rng(0)
    sharp = rng.lognormal(size=15)
    gap = 0.1 * np.log(sharp) + 0.05 * rng.normal(size=15)
    gap[3] = gap[4]  # a tie
    fig = plot.sharpness_vs_gap(sharp, gap, color_by=rng.integers(1, 5, 15) * 32,
                                color_label="batch size", log_x=True)
    saved(fig, tmp_path / "scatter.png")
    tau = scipy.stats.kendalltau(sharp, gap).statistic
    assert f"Kendall τ = {tau:.2f}" in fig.axes[0].get_title()
    np.testing.assert_allclose(plot._kendall_tau(sharp, gap), tau, rtol=1e-12)


def test_bad_plot_inputs(results):
    curve, surf, _ = results
    with pytest.raises(ValueError, match="metric"):
        plot.contour(surf, which="train_metric")
    with pytest.raises(ValueError, match="which"):
        plot.contour(surf, which="loss")
    with pytest.raises(ValueError, match="trajectory"):
        plot.contour(surf, trajectory=np.zeros((5, 3)))
    with pytest.raises(ValueError, match="Curve"):
        plot.curve(surf)
    with pytest.raises(ValueError, match="equal length"):
        plot.sharpness_vs_gap([1.0, 2.0], [1.0])
