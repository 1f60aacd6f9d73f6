"""Skip connections smooth the loss landscape (Li, Xu, Taylor, Studer & Goldstein 2018,
"Visualizing the Loss Landscape of Neural Nets").

Li et al. draw the loss on a plane through a trained network spanned by two random
*filter-normalized* directions (each filter of the direction rescaled to the norm of the
same filter of the weights, biases zeroed), and find that deep networks without skip
connections have chaotic, non-convex surfaces where the same depth with skips has a
smooth bowl. They quantify non-convexity by |λ_min / λ_max| of the Hessian: near zero
for a convex neighbourhood, large where negative curvature is as strong as positive.

The study trains `experiments.models.ResNet1D` on MNIST-1D twice, with and without its
identity skips (same depth, width, initialization seed, data order and optimizer), and
for each network computes

- the filter-normalized surface `ls.surface_2d` on the same two random directions (the
  parameter shapes agree, so the same seeds draw the same raw directions);
- |λ_min / λ_max| of the Hessian at the trained point (Lanczos, both ends);
- from the surface: the fraction of interior grid points where the surface's own 2 × 2
  curvature (central differences) has a negative eigenvalue, and the mean loss rise at
  radius `rise_radius` in the plane's coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import landscape as ls
from landscape import plot
from experiments import studies
from experiments.report import Figure
from experiments.schema import check, option
from experiments.train import build_model

NAME = "skip_connections"
SWEEP = False
VARIANTS = {"skip": True, "plain": False}

@dataclass(frozen=True)
class Model:
    """`experiments.models.ResNet1D`; both variants share everything but the skips."""

    width: int = option(8, ge=1)
    depth: int = option(6, ge=1, doc="residual blocks of two convolutions")
    kernel_size: int = option(5, ge=1)


@dataclass(frozen=True)
class Train(studies.Train):
    """Mini-batch training of both variants (`experiments.loop.fit`; data order from
    `seed + 1`)."""

    learning_rate: float = option(3e-3, gt=0)
    steps: int = option(600, ge=1, le=10**9)


@dataclass(frozen=True)
class Surface:
    """The filter-normalized 2-D surface through each trained network."""

    points: int = option(21, ge=3, doc="a points × points grid")
    radius: float = option(1.0, gt=0, doc="coordinates in [-radius, radius] along each "
                           "direction")
    num_examples: int = option(500, ge=1, doc="training examples the loss is taken on")
    chunk_size: int = option(500, ge=1)
    rise_radius: float = option(0.5, gt=0)
    seed: int = option(0, ge=0, le=2**32 - 1, doc="draws the two directions")


@dataclass(frozen=True)
class Measure:
    """|λ_min / λ_max| of the Hessian at each trained point."""

    lanczos_steps: int = option(20, ge=2)
    seed: int = option(0, ge=0, le=2**32 - 1)


@dataclass(frozen=True)
class Config(studies.Study):
    """A 1-D ResNet on MNIST-1D trained with and without its skips; surfaces and
    curvature."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    data: studies.MNIST1D = None
    model: Model = None
    train: Train = None
    surface: Surface = None
    measure: Measure = None

    def check(self, where):
        super().check(where)
        studies.check_batch(self.data, self.train)
        check(self.surface.num_examples <= self.data.num_train,
              "surface.num_examples must not exceed data.num_train")


# ---------------------------------------------------------------- pieces ---

def setup(cfg: dict, skip: bool):
    """`(apply_fn, loss_fn, init_params, train, test)` of one variant on MNIST-1D."""
    train, test = studies.mnist1d(cfg["data"]["num_train"], cfg["data"]["num_test"])
    m = cfg["model"]
    model = build_model({"name": "resnet", "width": m["width"], "depth": m["depth"],
                         "kernel_size": m["kernel_size"], "skip": skip},
                        train[0].shape[1], 10)
    params = model.init(jax.random.key(cfg["train"]["seed"]))

    def loss_fn(p, batch):
        return ls.cross_entropy(model.apply_fn(p, batch[0]), batch[1])

    return model.apply_fn, loss_fn, params, train, test


def train_model(cfg: dict, loss_fn, params, train):
    return studies.train_configured(cfg, loss_fn, params, train)


def directions(cfg: dict, params):
    k1, k2 = jax.random.split(jax.random.key(cfg["surface"]["seed"]))
    return (ls.filter_normalized_direction(k1, params),
            ls.filter_normalized_direction(k2, params))


def surface(cfg: dict, loss_fn, params, batch) -> ls.Surface:
    """`ls.surface_2d` one row of the grid at a time, the row's points vmapped together:
    XLA on CPU runs convolutions inside a loop body (`lax.map` over points) an order of
    magnitude slower than outside one, and a row is one pass without a loop."""
    s = cfg["surface"]
    grid = jnp.linspace(-s["radius"], s["radius"], s["points"])
    dirs = directions(cfg, params)
    rows = [ls.surface_2d(loss_fn, params, dirs, batch, xs=grid[i:i + 1], ys=grid,
                          chunk_size=s["chunk_size"], points_per_chunk=s["points"])
            for i in range(s["points"])]
    return ls.Surface(grid, grid, jnp.concatenate([r.train_loss for r in rows]),
                      None, None, None)


def negative_curvature_fraction(z, xs, ys) -> float:
    """Fraction of interior grid points where the central-difference 2 × 2 Hessian of
    the surface `z[i, j]` (at `(xs[i], ys[j])`) has a negative eigenvalue."""
    z = np.asarray(z, np.float64)
    hx, hy = float(xs[1] - xs[0]), float(ys[1] - ys[0])
    zxx = (z[2:, 1:-1] - 2 * z[1:-1, 1:-1] + z[:-2, 1:-1]) / hx ** 2
    zyy = (z[1:-1, 2:] - 2 * z[1:-1, 1:-1] + z[1:-1, :-2]) / hy ** 2
    zxy = (z[2:, 2:] - z[2:, :-2] - z[:-2, 2:] + z[:-2, :-2]) / (4 * hx * hy)
    smallest = 0.5 * (zxx + zyy) - np.sqrt(0.25 * (zxx - zyy) ** 2 + zxy ** 2)
    return float(np.mean(smallest < 0))


def rise_at(z, xs, ys, radius: float) -> float:
    """Mean of z − z(centre) over the grid points nearest the circle of `radius`
    (within half a grid step)."""
    z = np.asarray(z, np.float64)
    gx, gy = np.meshgrid(np.asarray(xs), np.asarray(ys), indexing="ij")
    r = np.hypot(gx, gy)
    ring = np.abs(r - radius) <= 0.5 * float(xs[1] - xs[0])
    centre = z[np.unravel_index(np.argmin(r), r.shape)]
    return float(np.mean(z[ring]) - centre)


def curvature(cfg: dict, loss_fn, params, batch) -> dict:
    h = ls.hessian(loss_fn, params, batch, chunk_size=cfg["surface"]["chunk_size"])
    eig = ls.eigenvalues(h, k=1, which="both", key=jax.random.key(cfg["measure"]["seed"]),
                         num_steps=cfg["measure"]["lanczos_steps"])
    lo, hi = float(jnp.min(eig.values)), float(jnp.max(eig.values))
    return {"lambda_min": lo, "lambda_max": hi, "ratio": abs(lo / hi)}


def run_variant(cfg: dict, run_dir: Path, name: str, log) -> None:
    apply_fn, loss_fn, init, train, test = setup(cfg, VARIANTS[name])
    n = cfg["surface"]["num_examples"]
    batch = (train[0][:n], train[1][:n])
    curve = {}

    def fit():
        out = train_model(cfg, loss_fn, init, train)
        curve["losses"] = np.asarray(out.losses)
        return out.params

    params = studies.array_piece(run_dir, f"params-{name}", fit, init, log)

    def trained():
        acc = lambda b: float(ls.accuracy(apply_fn(params, b[0]), b[1]))  # noqa: E731
        losses = curve.get("losses")
        return {"train_loss": float(loss_fn(params, train)), "train_accuracy": acc(train),
                "test_loss": float(loss_fn(params, test)), "test_accuracy": acc(test),
                "loss_curve": None if losses is None else [
                    float(losses[max(0, i - 49): i + 1].mean())
                    for i in range(49, len(losses), 50)]}

    info = studies.piece(run_dir, f"trained/{name}", trained, log)
    log(f"{name}: train loss {info['train_loss']:.3f}, test accuracy "
        f"{info['test_accuracy']:.3f}")

    def surf():
        s = surface(cfg, loss_fn, params, batch)
        return {"xs": np.asarray(s.xs).tolist(), "ys": np.asarray(s.ys).tolist(),
                "train_loss": np.asarray(s.train_loss).tolist()}

    s = studies.piece(run_dir, f"surface/{name}", surf, log)
    c = studies.piece(run_dir, f"curvature/{name}",
                      lambda: curvature(cfg, loss_fn, params, batch), log)
    log(f"{name}: |λ_min/λ_max| = {c['ratio']:.3g} (λ_min {c['lambda_min']:.3g}, λ_max "
        f"{c['lambda_max']:.3g}); negative-curvature fraction of the surface "
        f"{negative_curvature_fraction(s['train_loss'], s['xs'], s['ys']):.2f}")


def run(cfg: dict, run_dir: Path, log) -> None:
    for name in VARIANTS:
        run_variant(cfg, run_dir, name, log)


# ----------------------------------------------------------------- report ---

def summary(cfg: dict, done: dict) -> dict:
    """Per variant: trained metrics, curvature and the surface's proxies."""
    out = {}
    for name in VARIANTS:
        if f"surface/{name}" not in done or f"curvature/{name}" not in done:
            continue
        s = done[f"surface/{name}"]
        out[name] = {**done[f"trained/{name}"], **done[f"curvature/{name}"],
                     "negative_fraction": negative_curvature_fraction(
                         s["train_loss"], s["xs"], s["ys"]),
                     "rise": rise_at(s["train_loss"], s["xs"], s["ys"],
                                     cfg["surface"]["rise_radius"])}
    return out


def report(run_dir: Path) -> list[str]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    done = studies.load_json(Path(run_dir) / studies.RESULTS, {})
    rows = summary(cfg, done)
    if not rows:
        return ["No surface computed yet."]
    m = cfg["model"]
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, len(rows))
    axes = np.atleast_1d(axes)
    labels = {"skip": "with skip connections", "plain": "without skip connections"}
    for ax, (name, r) in zip(axes, rows.items()):
        s = done[f"surface/{name}"]
        surf = ls.Surface(np.asarray(s["xs"]), np.asarray(s["ys"]),
                          np.asarray(s["train_loss"]), None, None, None)
        plot.contour(surf, ax=ax, levels=25, xlabel="filter-normalized direction 1",
                     ylabel="filter-normalized direction 2",
                     title=f"{labels[name]}\n|λmin/λmax| = {r['ratio']:.2g}, loss rise at "
                           f"r = {cfg['surface']['rise_radius']:g}: {r['rise']:.3g}")
    fig.savefig(Path(run_dir) / "skip_connections.png", dpi=80)
    sc = cfg["surface"]
    lines = ["## Filter-normalized surfaces with and without skip connections", "",
             f"ResNet1D, {m['depth']} blocks of two convolutions (width {m['width']}, "
             f"kernel {m['kernel_size']}), {cfg['train']['steps']} steps of "
             f"{cfg['train']['optimizer']} (η = {cfg['train']['learning_rate']:g}); "
             f"{sc['points']}×{sc['points']} grid over ±{sc['radius']:g} on "
             f"{sc['num_examples']} training examples, both networks on the same two "
             "random directions.", "",
             "| network | train loss | test accuracy | λ_max | λ_min | |λ_min/λ_max| | "
             f"non-convex grid points | loss rise at r = {sc['rise_radius']:g} |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {labels[name]} | {r['train_loss']:.3f} | {r['test_accuracy']:.3f} "
                     f"| {r['lambda_max']:.4g} | {r['lambda_min']:.3g} | {r['ratio']:.3g} | "
                     f"{100 * r['negative_fraction']:.0f}% | {r['rise']:.3g} |")
    lines += ["", "![surfaces](skip_connections.png)", ""]
    return lines
