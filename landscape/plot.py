"""Figures of curves, surfaces, spectra and sharpness (the only matplotlib user in
`landscape`).

Every function returns a `matplotlib.figure.Figure` built without `pyplot`, so nothing
is shown, no global figure state is touched and any backend (or none) works: save it
with `fig.savefig("out.png")`. Pass `ax=` to draw into an axes of your own figure.

    >>> from landscape import plot
    >>> plot.contour(surf, trajectory=pca.coordinates).savefig("surface.png")
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

from landscape.spectrum import Density
from landscape.surfaces import Curve, Surface

_LABELS = {"train_loss": "train loss", "test_loss": "test loss",
           "train_metric": "train metric", "test_metric": "test metric"}


def _axes(ax: Axes | None, size=(5.5, 4.0), projection: str | None = None) -> Axes:
    if ax is not None:
        return ax
    fig = Figure(figsize=size, layout="constrained")
    return fig.add_subplot(projection=projection)


def _field(surface: Surface, which: str) -> np.ndarray:
    if which not in _LABELS:
        raise ValueError(f"`which` must be one of {', '.join(map(repr, _LABELS))}; got "
                         f"{which!r}.")
    z = getattr(surface, which)
    if z is None:
        raise ValueError(f"The surface has no {which!r}: pass `metric_fn` / `test_batch` "
                         "when computing it.")
    return np.asarray(z)


def curve(data: Curve, *, ax: Axes | None = None, xlabel: str = "α",
          metric_label: str = "accuracy", title: str | None = None,
          log: bool = False) -> Figure:
    """Loss (left axis) and, when present, the metric (right axis) along a line.

    Train is solid, test dashed; α = 0 (the centre, or `params_a`) is marked.

    Example:
      >>> plot.curve(ls.interpolate(loss_fn, p0, p1, (x, y)),
      ...            xlabel="α (0 = init, 1 = trained)")
    """
    if not isinstance(data, Curve):
        raise ValueError(f"`data` must be a `Curve` (from surface_1d / interpolate); got "
                         f"{type(data).__name__}.")
    ax = _axes(ax)
    a = np.asarray(data.alphas)
    ax.plot(a, np.asarray(data.train_loss), color="C0", label="train loss")
    if data.test_loss is not None:
        ax.plot(a, np.asarray(data.test_loss), color="C0", ls="--", label="test loss")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss", color="C0")
    if log:
        ax.set_yscale("log")
        # Plain numbers on major and minor ticks: losses often span less than a decade.
        ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                  minor_thresholds=(2, 0.5)))
    ax.axvline(0.0, color="0.7", lw=0.8, zorder=0)
    handles, labels = ax.get_legend_handles_labels()
    if data.train_metric is not None:
        ax2 = ax.twinx()
        ax2.plot(a, np.asarray(data.train_metric), color="C1", label=f"train {metric_label}")
        if data.test_metric is not None:
            ax2.plot(a, np.asarray(data.test_metric), color="C1", ls="--",
                     label=f"test {metric_label}")
        ax2.set_ylabel(metric_label, color="C1")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    # Above the axes: "best" sees only one of the two y axes and lands on the other's curves.
    ax.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2,
              fontsize="small", frameon=False)
    if title:
        ax.figure.suptitle(title)
    return ax.figure


def contour(surface: Surface, *, which: str = "train_loss", trajectory: Any = None,
            levels: int = 30, log: bool = True, ax: Axes | None = None,
            xlabel: str = "direction 1", ylabel: str = "direction 2",
            title: str | None = None) -> Figure:
    """Filled contours of one field of a 2-D surface, with an optional trajectory.

    Args:
      surface: a `Surface` from `surface_2d`.
      which: `"train_loss"`, `"test_loss"`, `"train_metric"` or `"test_metric"`.
      trajectory: `(T, 2)` coordinates to draw as a path (e.g.
        `pca_directions(...).coordinates`); its last point is marked.
      levels: number of contour levels.
      log: logarithmic colour scale (losses span decades away from a minimum).

    Example:
      >>> plot.contour(surf, trajectory=pca.coordinates, xlabel="PC 1", ylabel="PC 2")
    """
    z = _field(surface, which).T  # contour wants (ny, nx)
    x, y = np.asarray(surface.xs), np.asarray(surface.ys)
    ax = _axes(ax, size=(5.5, 4.6))
    use_log = log and np.all(z > 0) and z.max() > z.min()
    if use_log:
        lv = np.geomspace(z.min(), z.max(), levels)
        cs = ax.contourf(x, y, z, levels=lv, norm=LogNorm(), cmap="viridis")
    else:
        cs = ax.contourf(x, y, z, levels=levels, cmap="viridis")
    ax.contour(x, y, z, levels=cs.levels[::3], colors="white", linewidths=0.5, alpha=0.6)
    ax.figure.colorbar(cs, ax=ax, label=_LABELS[which],
                       format="%.3g")
    ax.plot([0.0], [0.0], marker="*", color="red", ms=11, ls="none", label="centre")
    if trajectory is not None:
        t = np.asarray(trajectory)
        if t.ndim != 2 or t.shape[1] != 2:
            raise ValueError(f"`trajectory` must have shape (T, 2); got {t.shape}.")
        ax.plot(t[:, 0], t[:, 1], color="white", lw=1.2, marker="o", ms=2.5,
                mec="black", mew=0.4, label="trajectory")
        ax.plot(t[:1, 0], t[:1, 1], marker="s", color="orange", ms=6, ls="none",
                label="start")
    ax.legend(loc="upper right", fontsize="small", framealpha=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_aspect("auto")
    if title:
        ax.set_title(title)
    return ax.figure


def surface_3d(surface: Surface, *, which: str = "train_loss", log: bool = False,
               ax: Axes | None = None, xlabel: str = "direction 1",
               ylabel: str = "direction 2", title: str | None = None) -> Figure:
    """A 3-D view of one field of a 2-D surface.

    Example:
      >>> plot.surface_3d(surf, log=True).savefig("surface3d.png")
    """
    z = _field(surface, which).T
    x, y = np.meshgrid(np.asarray(surface.xs), np.asarray(surface.ys))
    ax = _axes(ax, size=(6.0, 5.0), projection="3d")
    zlabel = _LABELS[which]
    if log:
        z = np.log10(np.maximum(z, np.finfo(float).tiny))
        zlabel = f"log10 {zlabel}"
    ax.plot_surface(x, y, z, cmap="viridis", rstride=1, cstride=1, linewidth=0,
                    antialiased=True)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_zlabel(zlabel)
    if title:
        ax.set_title(title)
    return ax.figure


def density(den: Density, *, log: bool = True, ax: Axes | None = None,
            title: str | None = None, show_nodes: bool = True) -> Figure:
    """The smoothed spectral density of a `ls.density` result (Ghorbani et al. 2019).

    The curve is `den.values` on `den.grid`; the Ritz values (quadrature nodes) are
    drawn as ticks along the bottom. A log density axis shows the outliers beside the
    bulk.

    Example:
      >>> plot.density(ls.density(H, key=jax.random.key(0))).savefig("spectrum.png")
    """
    if not isinstance(den, Density):
        raise ValueError(f"`den` must be an `ls.Density`; got {type(den).__name__}.")
    ax = _axes(ax)
    grid, values = np.asarray(den.grid), np.asarray(den.values)
    if log:
        floor = max(values.max() * 1e-8, np.finfo(float).tiny)
        ax.semilogy(grid, np.maximum(values, floor), color="C0")
        ax.set_ylim(bottom=floor)
    else:
        ax.plot(grid, values, color="C0")
    if show_nodes:
        nodes = np.asarray(den.nodes).ravel()
        ax.plot(nodes, np.zeros_like(nodes), "|", color="C3", ms=8,
                transform=ax.get_xaxis_transform(), label="Ritz values")
        ax.legend(loc="upper right", fontsize="small")
    ax.set_xlabel("eigenvalue λ")
    ax.set_ylabel("density (log)" if log else "density")
    ax.set_title(title or f"spectral density (σ = {float(den.sigma):.3g})")
    return ax.figure


def _kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's τ-b (ties in either variable counted as in the tau-b definition)."""
    dx = np.sign(x[:, None] - x[None, :])
    dy = np.sign(y[:, None] - y[None, :])
    iu = np.triu_indices(len(x), 1)
    dx, dy = dx[iu], dy[iu]
    denom = np.sqrt(np.sum(dx != 0) * np.sum(dy != 0))
    return float(np.sum(dx * dy) / denom) if denom > 0 else float("nan")


def sharpness_vs_gap(sharpness: Sequence[float], gap: Sequence[float], *,
                     color_by: Sequence[float] | None = None,
                     color_label: str = "", labels: Sequence[str] | None = None,
                     log_x: bool = False, ax: Axes | None = None,
                     xlabel: str = "sharpness", ylabel: str = "generalization gap",
                     title: str | None = None) -> Figure:
    """Scatter of a sharpness measure against the generalization gap, one point per
    trained model, with Kendall's τ in the title (the rank correlation Jiang et al.
    2020 use to rank generalization measures).

    Args:
      sharpness, gap: equal-length sequences.
      color_by: optional value per point (batch size, learning rate) for the colour.
      labels: optional text per point.

    Example:
      >>> plot.sharpness_vs_gap(sharp, test_loss - train_loss, color_by=batch_sizes,
      ...                       color_label="batch size", log_x=True)
    """
    x, y = np.asarray(sharpness, float).ravel(), np.asarray(gap, float).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"`sharpness` and `gap` must be non-empty and of equal length; "
                         f"got {x.size} and {y.size}.")
    ax = _axes(ax)
    if color_by is not None:
        c = np.asarray(color_by, float).ravel()
        if c.shape != x.shape:
            raise ValueError("`color_by` must have one value per point.")
        sc = ax.scatter(x, y, c=c, cmap="plasma", edgecolors="black", linewidths=0.4)
        ax.figure.colorbar(sc, ax=ax, label=color_label)
    else:
        ax.scatter(x, y, color="C0", edgecolors="black", linewidths=0.4)
    if labels is not None:
        for xi, yi, s in zip(x, y, labels):
            ax.annotate(str(s), (xi, yi), fontsize="x-small", xytext=(3, 3),
                        textcoords="offset points")
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    tau = _kendall_tau(x, y) if x.size > 1 else float("nan")
    ax.set_title(f"{title + ': ' if title else ''}Kendall τ = {tau:.2f}  (n = {x.size})")
    return ax.figure
