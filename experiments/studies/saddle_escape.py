"""Escaping a strict saddle: gradient descent needs log(1/distance) steps, noise does not.

f(u, v) = ½ a ‖u‖² − ½ μ v² + q v⁴ (u ∈ R^{d−1}) has a strict saddle at 0 whose stable
manifold is v = 0. Started a distance δ from it (v₀ = δ), gradient descent multiplies the
unstable coordinate by (1 + ημ) per step while v is small, so it needs about
ln(r/δ) / ln(1 + ημ) steps to leave a ball of radius r, which grows without bound as
δ → 0 and is infinite on the manifold itself. Heavy-ball momentum grows it by the larger
root z₊ of z² − (1 + β + ημ) z + β = 0 per step (faster, same logarithm). Gradient noise
(SGD-like, N(0, σ²) per coordinate) and perturbed gradient descent (Jin et al. 2017, "How
to escape saddle points efficiently": a uniform kick of radius r_p when ‖∇f‖ is small and
no kick was given for t_thres steps) put the iterate off the manifold by themselves, so
their escape time stops growing once δ is below the noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import studies
from experiments.loop import fit
from experiments.report import Figure
from experiments.schema import check, option


NAME = "saddle_escape"
SWEEP = False
METHODS = ("gd", "momentum", "noisy_gd", "perturbed_gd")
LABELS = {"gd": "GD", "momentum": "GD + momentum", "noisy_gd": "GD + gradient noise (SGD-like)",
          "perturbed_gd": "perturbed GD (Jin et al. 2017)"}

Method = Literal[METHODS]


@dataclass(frozen=True)
class Config(studies.Study):
    """f(u, v) = ½ a ‖u‖² − ½ μ v² + q v⁴ from starts at distances δ from its stable
    manifold, escape steps per method."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    dim: int = option(10, ge=2, doc="d: d − 1 stable coordinates and one unstable")
    stable_curvature: float = option(1.0, gt=0, doc="a")
    unstable_curvature: float = option(1.0, gt=0, doc="μ (the Hessian's negative "
                                       "eigenvalue is −μ)")
    quartic: float = option(0.25, ge=0, doc="q: the minima sit at v = ±√(μ / 4q)")
    stable_offset: float = option(0.1, ge=0, doc="‖u₀‖ (spread evenly over the stable "
                                  "coordinates), below radius")
    radius: float = option(0.5, gt=0, doc="escaped: ‖θ‖ >= radius")
    distances: tuple[float, ...] = option(
        (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-10, 1e-12), gt=0,
        doc="δ, each below radius")
    include_zero: bool = option(True, doc="also start on the stable manifold (v₀ = 0)")
    max_steps: int = option(3000, ge=1, le=10**9)
    seeds: int = option(20, ge=1)
    methods: tuple[Method, ...] = METHODS
    learning_rate: float = option(0.1, gt=0)
    momentum: float = option(0.9, ge=0, doc="below 1")
    noise: float = option(1e-3, gt=0, doc="σ of the gradient noise")
    perturb_radius: float = option(1e-3, gt=0, doc="r_p of perturbed GD")
    perturb_gradient: float = option(1e-3, gt=0, doc="kick when ‖∇f‖ <= this ...")
    perturb_interval: int = option(20, ge=1, doc="... and no kick in this many steps")

    def check(self, where):
        super().check(where)
        studies.nonempty(self, where, "distances", "methods")
        check(self.momentum < 1, f"momentum must be below 1, got {self.momentum}")
        check(self.stable_offset < self.radius, "stable_offset must be below radius")
        check(max(self.distances) < self.radius, "distances must be below radius "
              f"({self.radius}), got {list(self.distances)}")


def loss(theta, cfg: dict):
    u, v = theta[:-1], theta[-1]
    return (0.5 * cfg["stable_curvature"] * jnp.sum(u ** 2)
            - 0.5 * cfg["unstable_curvature"] * v ** 2 + cfg["quartic"] * v ** 4)


def gd_steps_predicted(distance, cfg: dict) -> float:
    """Steps for v to grow from `distance` to `radius` under the quadratic part alone."""
    rate = 1.0 + cfg["learning_rate"] * cfg["unstable_curvature"]
    return math.log(cfg["radius"] / distance) / math.log(rate)


def momentum_rate(cfg: dict) -> float:
    """Per-step growth of the unstable coordinate under heavy-ball momentum."""
    b, e = cfg["momentum"], cfg["learning_rate"] * cfg["unstable_curvature"]
    s = 1.0 + b + e
    return (s + math.sqrt(s * s - 4 * b)) / 2


def _uniform_ball(key, dim, radius, dtype):
    k1, k2 = jax.random.split(key)
    x = jax.random.normal(k1, (dim,), dtype)
    r = radius * jax.random.uniform(k2, (), dtype) ** (1.0 / dim)
    return r * x / jnp.linalg.norm(x)


class KickState(NamedTuple):
    key: jax.Array        # the method's own random stream, split once per step
    last_kick: jax.Array  # the step of the last perturbation
    t: jax.Array          # steps taken


def escape_optimizer(cfg: dict, method: str, key) -> optax.GradientTransformation:
    """`method` as an optax transformation: GD (`gd`), heavy-ball momentum, GD with
    N(0, σ²) gradient noise, or perturbed GD (Jin et al. 2017, Algorithm 1: a uniform
    kick in the r_p-ball when ‖∇f‖ ≤ g_thres and no kick for t_thres steps; the step
    then takes the gradient at the kicked point, through `train_step`'s `grad_fn`)."""
    base = optax.sgd(cfg["learning_rate"],
                     momentum=cfg["momentum"] if method == "momentum" else None)

    def init(params):
        return base.init(params), KickState(key, jnp.asarray(-10 ** 9), jnp.asarray(0))

    def update(g, state, params, *, grad_fn=None, **extra):
        inner, ks = state
        key, k_noise, k_kick = jax.random.split(ks.key, 3)
        kick, last = None, ks.last_kick
        if method == "noisy_gd":
            g = g + cfg["noise"] * jax.random.normal(k_noise, g.shape, g.dtype)
        if method == "perturbed_gd":
            due = ((jnp.linalg.norm(g) <= cfg["perturb_gradient"])
                   & (ks.t - last > cfg["perturb_interval"]))
            kick = jnp.where(due, 1.0, 0.0) * _uniform_ball(
                k_kick, params.shape[0], cfg["perturb_radius"], params.dtype)
            last = jnp.where(due, ks.t, last)
            g = grad_fn(params + kick)
        updates, inner = base.update(g, inner, params)
        updates = updates if kick is None else kick + updates
        return updates, (inner, KickState(key, last, ks.t + 1))

    return optax.GradientTransformationExtraArgs(init, update)


def escape_steps(cfg: dict, method: str, distances, keys) -> np.ndarray:
    """Steps to leave the ball, shape (len(distances), len(keys)); −1: not escaped within
    `max_steps`."""
    d = cfg["dim"]
    u0 = jnp.full((d - 1,), cfg["stable_offset"] / math.sqrt(d - 1))

    def one(distance, key):
        theta = jnp.concatenate([u0, distance[None]])
        out = fit(lambda th, batch: loss(th, cfg), theta, escape_optimizer(cfg, method, key),
                  jnp.zeros((1,)), steps=cfg["max_steps"], key=key, scan=True,
                  record=jnp.linalg.norm, record_every=1)
        outside = out.records[1:] >= cfg["radius"]   # after steps 1, 2, …
        return jnp.where(jnp.any(outside), jnp.argmax(outside) + 1, -1)

    fn = jax.jit(jax.vmap(jax.vmap(one, in_axes=(None, 0)), in_axes=(0, None)))
    return np.asarray(fn(jnp.asarray(distances, jnp.float32), keys))


def starts(cfg: dict) -> list[float]:
    return list(cfg["distances"]) + ([0.0] if cfg["include_zero"] else [])


def run_method(cfg: dict, method: str) -> dict:
    deterministic = method in ("gd", "momentum")
    seeds = 1 if deterministic else cfg["seeds"]
    keys = jax.random.split(jax.random.key(0), seeds)
    steps = escape_steps(cfg, method, starts(cfg), keys)
    med = [float(np.median(row[row >= 0])) if (row >= 0).any() else None for row in steps]
    return {"distances": starts(cfg), "steps": steps.tolist(), "median": med,
            "escaped_fraction": [float(np.mean(row >= 0)) for row in steps]}


def log_slope(distances, steps) -> float:
    """Least-squares slope of steps against ln(1/distance) over the escaped starts."""
    x = [math.log(1 / d) for d, s in zip(distances, steps) if d > 0 and s is not None]
    y = [s for d, s in zip(distances, steps) if d > 0 and s is not None]
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else float("nan")


def run(cfg: dict, run_dir: Path, log) -> None:
    for method in cfg["methods"]:
        out = studies.piece(run_dir, method, lambda: run_method(cfg, method), log)
        log(f"{method}: median steps {out['median']}")


def figure(cfg: dict, res: dict, path: Path) -> None:
    """Escape steps against δ per method (10–90 % band over seeds), GD's prediction."""
    pos = cfg["distances"]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    zero_x = min(pos) / 30  # where the start on the manifold is drawn
    top = max((m for r in res.values() for m in r["median"] if m is not None), default=1)
    never = 0
    for method in cfg["methods"]:
        r = res.get(method)
        if r is None:
            continue
        steps = np.asarray(r["steps"], float)
        steps[steps < 0] = np.nan
        xs = [d if d > 0 else zero_x for d in r["distances"]]
        med = [m if m is not None else np.nan for m in r["median"]]
        line, = ax.plot(xs, med, marker="o", ms=4, label=LABELS[method])
        if steps.shape[1] > 1:
            lo = np.nanpercentile(steps, 10, axis=1)
            hi = np.nanpercentile(steps, 90, axis=1)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        for x, m in zip(xs, r["median"]):
            if m is None:
                y = top * (1.08 + 0.06 * never)
                never += 1
                ax.plot([x], [y], marker="^", color=line.get_color(), ms=7)
                ax.annotate(f"{LABELS[method]}: never", (x, y), textcoords="offset points",
                            xytext=(6, -3), fontsize=7)
    grid = np.geomspace(min(pos), max(pos), 50)
    ax.plot(grid, [gd_steps_predicted(d, cfg) for d in grid], "k--", lw=1,
            label="ln(r/δ) / ln(1+ημ)")
    ax.set_xscale("log")
    ax.set_xlabel("distance δ from the stable manifold (leftmost: δ = 0)")
    ax.set_ylabel(f"steps to leave the ball r = {cfg['radius']:g}")
    ax.set_title(f"Escaping a strict saddle (d = {cfg['dim']}, η = {cfg['learning_rate']:g})")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def report(run_dir: Path) -> list[str]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    res = studies.results(run_dir)
    figure(cfg, res, Path(run_dir) / "saddle_escape.png")
    lines = ["## Escaping a strict saddle", "",
             f"f = ½·{cfg['stable_curvature']:g}‖u‖² − ½·{cfg['unstable_curvature']:g}v² + "
             f"{cfg['quartic']:g}v⁴ in {cfg['dim']} dimensions; η = {cfg['learning_rate']:g}; "
             f"escape = leaving the ball of radius {cfg['radius']:g} (at most "
             f"{cfg['max_steps']} steps, '—': not escaped); median over {cfg['seeds']} seeds "
             "for the noisy methods.", "",
             "| δ | " + " | ".join(LABELS[m] for m in cfg["methods"] if m in res)
             + " | ln(r/δ)/ln(1+ημ) |", "|---|" + "---|" * (len(res) + 1)]
    for i, d in enumerate(starts(cfg)):
        cells = []
        for m in cfg["methods"]:
            if m not in res:
                continue
            med, frac = res[m]["median"][i], res[m]["escaped_fraction"][i]
            cells.append("—" if med is None else f"{med:g}" +
                         ("" if frac == 1 else f" ({frac:.0%} escaped)"))
        pred = f"{gd_steps_predicted(d, cfg):.1f}" if d > 0 else "∞"
        lines.append(f"| {d:g} | " + " | ".join(cells) + f" | {pred} |")
    lines += ["", "Slope of steps against ln(1/δ) (GD's prediction: 1/ln(1+ημ) = "
              f"{1 / math.log(1 + cfg['learning_rate'] * cfg['unstable_curvature']):.2f}; "
              f"momentum's: 1/ln z₊ = {1 / math.log(momentum_rate(cfg)):.2f}):", ""]
    for m in cfg["methods"]:
        if m in res:
            lines.append(f"- {LABELS[m]}: {log_slope(res[m]['distances'], res[m]['median']):.2f}")
    lines += ["", "![escaping a saddle](saddle_escape.png)", ""]
    return lines
