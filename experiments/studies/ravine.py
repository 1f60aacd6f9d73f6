"""The ravine: how optimizers cross an ill-conditioned valley.

A narrow valley is where plain gradient descent is slowest: the stable step is set by the
steep direction (η < 2/λ_max) and progress along the floor by the flat one, so the steps
needed grow with the condition number κ = λ_max/λ_min. Momentum (Polyak 1964) cuts that
to about √κ; Adam (Kingma & Ba 2015) and Lion (Chen et al. 2023) rescale each coordinate;
Shampoo (Gupta et al. 2018) and K-FAC (Martens & Grosse 2015) precondition with a full
(Kronecker-factored) matrix and so also undo a rotated valley.

Two problems in a 2-D parameter `w`, held as a (2, 1) matrix `W` (a dense layer that
K-FAC can see). Shampoo preconditions tensors of rank >= 2 and passes a vector (size-1
dimensions dropped) to its graft, where it would follow Adam's path exactly; so Shampoo
gets `W = [w, w]` (2 × 2) and the loss is the mean over the columns. Shampoo treats the
two identical columns alike (the all-ones vector is an eigenvector of its right
statistic), so they stay equal and its path is a path of `w`: the left factor
Σ g gᵀ then acts as a full 2 × 2 preconditioner, raised to the power −1/4.

- an ill-conditioned quadratic ½ (w − w*)ᵀ A (w − w*), A with the configured eigenvalues
  rotated by `angle` degrees, written as least squares on a linear model `x @ w` whose
  inputs satisfy xᵀx / n = A exactly. K-FAC needs such a model (`apply_fn`): its factors
  are then A (inputs) and E[g²] ≈ 1 (output gradients at sampled targets), so K-FAC is a
  damped Newton step here.
- Rosenbrock's banana (1 − u)² + b (v − u²)², minimum 0 at (1, 1). It is not a
  layered model, so K-FAC (which preconditions dense layers) does not apply and is left
  out of this panel.

Each optimizer runs from the same start over a log grid of learning rates (one vmapped
program per optimizer and problem); the learning rate that reaches the tolerance in the
fewest steps (or, if none does, ends lowest) is reported and drawn.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import landscape as ls
import transforms as tx
from experiments import studies
from experiments.loop import fit
from experiments.report import Figure, matplotlib
from experiments.schema import as_dict, check, fail, option

NAME = "ravine"
SWEEP = False
OPTIMIZERS = ("sgd", "momentum", "adam", "lion", "shampoo", "kfac")
PROBLEMS = ("quadratic", "rosenbrock")

Pair = tuple[float, ...]   # two numbers
# Hyper-parameters other than the learning rate, as `transforms.make` takes them (a
# config may add any other keyword of the optimizer).
HYPER = {"sgd": {}, "momentum": {"momentum": 0.9}, "adam": {"b1": 0.9, "b2": 0.999},
         "lion": {"b1": 0.9, "b2": 0.99, "weight_decay": 0.0},
         "shampoo": {"precondition_every": 1, "start_preconditioning_step": 1},
         "kfac": {"damping": 1e-3, "inverse_every": 1, "decay": 0.95, "loss": "mse"}}


def _pairs(table, where: str, keys, low_high: bool = False) -> None:
    what = "[low, high] with low <= high" if low_high else "two numbers"
    for key, v in ((k, getattr(table, k)) for k in keys):
        check(len(v) == 2 and (not low_high or v[0] <= v[1]),
              f"{where}.{key} must be {what}, got {list(v)}")


class _Ranges:
    def check(self, where):
        _pairs(self, where, OPTIMIZERS, low_high=True)


def _table(name: str, doc: str, defaults: dict, ranges: bool = False) -> type:
    """A frozen table with a key per entry of `defaults`, typed by its default: the
    learning-rate ranges per optimizer, or one optimizer's (open) hyper-parameters."""
    meta = {"gt": 0} if ranges else {}
    fields = [(k, Pair if isinstance(v, tuple) else type(v),
               dataclasses.field(default=v, metadata=meta)) for k, v in defaults.items()]
    return dataclasses.make_dataclass(name, fields, bases=(_Ranges,) if ranges else (),
                                      frozen=True, namespace={"__doc__": doc,
                                                              "OPEN": not ranges})


RATES = "Log-grid [low, high] of learning rates per optimizer."
QuadraticRates = _table("QuadraticRates", RATES, dict(
    sgd=(0.1, 2.0), momentum=(0.01, 2.0), adam=(0.003, 1.0), lion=(0.0003, 0.1),
    shampoo=(0.003, 1.0), kfac=(0.03, 1.0)), ranges=True)
RosenbrockRates = _table("RosenbrockRates", RATES, dict(
    sgd=(1e-4, 4e-3), momentum=(1e-5, 4e-3), adam=(1e-3, 1.0), lion=(1e-4, 0.03),
    shampoo=(1e-3, 1.0), kfac=(1e-3, 0.3)), ranges=True)
Hyper = dataclasses.make_dataclass(
    "Hyper", [(n, _table(n, f"`{n}`'s hyper-parameters (any keyword of the optimizer).",
                         d), None) for n, d in HYPER.items()],
    frozen=True, namespace={"__doc__": "Hyper-parameters other than the learning rate."})


@dataclass(frozen=True)
class Quadratic:
    """Least squares on a linear model whose inputs satisfy xᵀx / n = A exactly."""

    eigenvalues: Pair = option((1.0, 0.01), gt=0, doc="of A (condition number 100)")
    angle: float = option(30.0, doc="degrees: the valley is not aligned with the axes")
    start: Pair = (-1.5, 1.5)
    minimum: Pair = (0.0, 0.0)
    num_examples: int = option(32, ge=2)
    steps: int = option(1000, ge=1, le=10**7)
    tolerance: float = option(1e-6, gt=0)
    learning_rates: QuadraticRates = None

    def check(self, where):
        _pairs(self, where, ("eigenvalues", "start", "minimum"))


@dataclass(frozen=True)
class Rosenbrock:
    """(1 − u)² + b (v − u²)², minimum 0 at (1, 1)."""

    b: float = option(100.0, gt=0)
    start: Pair = (-1.2, 1.0)
    steps: int = option(10000, ge=1, le=10**7)
    tolerance: float = option(1e-4, gt=0)
    learning_rates: RosenbrockRates = None

    def check(self, where):
        _pairs(self, where, ("start",))


@dataclass(frozen=True)
class Config(studies.Study):
    """Optimizers across an ill-conditioned quadratic and Rosenbrock's valley."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    optimizers: tuple[Literal[OPTIMIZERS], ...] = OPTIMIZERS
    num_learning_rates: int = option(12, ge=1, doc="log grid per optimizer; the best "
                                     "rate is drawn")
    quadratic: Quadratic = None
    rosenbrock: Rosenbrock = None
    hyper: Hyper = None

    def check(self, where):
        super().check(where)
        studies.nonempty(self, where, "optimizers")
        for name in self.optimizers:   # K-FAC finds its layer on a stand-in problem
            try:
                make_optimizer(name, 0.1, as_dict(getattr(self.hyper, name)), linear_apply,
                               as_params([0.0, 0.0]), (jnp.zeros((1, 2)), jnp.zeros((1, 1))))
            except (ValueError, TypeError) as e:
                fail(f"hyper.{name}: {str(e).splitlines()[0]}")


# ------------------------------------------------------ problems, optimizers ---

def quadratic_matrix(eigenvalues, angle: float) -> np.ndarray:
    """A = R diag(eigenvalues) Rᵀ, R the rotation by `angle` degrees."""
    t = math.radians(angle)
    r = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return r @ np.diag(np.asarray(eigenvalues, np.float64)) @ r.T


def regression_data(eigenvalues, angle: float, minimum, num_examples: int):
    """Inputs `x` (n, 2) with xᵀx / n = A exactly and targets `y = x @ w*` (n, 1), so the
    least-squares loss mean ½ (x·w − y)² is ½ (w − w*)ᵀ A (w − w*)."""
    rng = np.random.default_rng(0)
    frame, _ = np.linalg.qr(rng.normal(size=(num_examples, 2)))   # orthonormal columns
    a = quadratic_matrix(eigenvalues, angle)
    vals, vecs = np.linalg.eigh(a)
    x = math.sqrt(num_examples) * frame @ np.diag(np.sqrt(vals)) @ vecs.T
    y = x @ np.asarray(minimum, np.float64)[:, None]
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def linear_apply(params, x):
    return x @ params["w"]


def regression_loss(params, batch):
    """Mean over the columns w_c of W of ½ (w_c − w*)ᵀ A (w_c − w*): least squares,
    `ls.mse` (mean over examples of ½‖xW − y‖²) divided by the number of columns."""
    x, y = batch
    out = linear_apply(params, x)
    return ls.mse(out, jnp.broadcast_to(y, out.shape)) / out.shape[-1]


def rosenbrock_loss(b: float):
    def loss_fn(params, batch):
        del batch
        u, v = params["w"][0], params["w"][1]
        return jnp.mean((1.0 - u) ** 2 + b * (v - u ** 2) ** 2)
    return loss_fn


def copies(name: str) -> int:
    """Columns of W: two identical ones for Shampoo (see the module docstring)."""
    return 2 if name == "shampoo" else 1


def as_params(point, columns: int = 1) -> dict:
    w = jnp.asarray(point, jnp.float32).reshape(2, 1)
    return {"w": jnp.tile(w, (1, columns))}


def problem(cfg: dict, which: str, columns: int = 1):
    """`(loss_fn, batch, apply_fn, start)` of the quadratic or Rosenbrock panel."""
    p = cfg[which]
    start = as_params(p["start"], columns)
    if which == "quadratic":
        batch = regression_data(p["eigenvalues"], p["angle"], p["minimum"],
                                p["num_examples"])
        return regression_loss, batch, linear_apply, start
    return rosenbrock_loss(float(p["b"])), jnp.zeros((1,)), None, start


def make_optimizer(name: str, learning_rate, hyper: dict, apply_fn=None, params=None,
                   batch=None):
    kw = dict(hyper)
    if name == "kfac":
        kw["layers"] = tx.find_dense_layers(apply_fn, params, batch[0][:1])
    return tx.make(name, learning_rate=learning_rate, **kw)


def trajectories(name: str, learning_rates, hyper: dict, loss_fn, batch, start, steps: int,
                 apply_fn=None):
    """Points `(L, steps + 1, 2)` and losses `(L, steps + 1)` of optimizer `name` from
    `start`, one row per learning rate (vmapped), via `transforms.train_step`."""
    def one(lr):
        opt = make_optimizer(name, lr, hyper, apply_fn, start, batch)
        # Step keys fold_in(key(0), t); no optimizer of the study draws from them.
        out = fit(loss_fn, start, opt, batch, steps=steps, key=jax.random.key(0),
                  apply_fn=apply_fn, scan=True, record_every=1,
                  record=lambda p: (p["w"][:, 0], loss_fn(p, batch)))
        return out.records

    return jax.jit(jax.vmap(one))(jnp.asarray(learning_rates, jnp.float32))


def steps_to(losses, tolerance: float) -> np.ndarray:
    """Per row, the first step from which the loss stays below `tolerance` to the end of
    the run (-1 if it ends above; NaN counts as above). A run that dips below and
    bounces out (a learning rate past the edge of stability) has not converged."""
    above = ~(np.asarray(losses) < tolerance)
    n = above.shape[-1]
    last = n - 1 - np.argmax(above[..., ::-1], axis=-1)   # last step at or above
    return np.where(above[..., -1], -1, np.where(above.any(axis=-1), last + 1, 0))


def best(learning_rates, losses, tolerance: float) -> int:
    """The row that reaches `tolerance` first, else the one that ends lowest."""
    reached = steps_to(losses, tolerance)
    if (reached >= 0).any():
        return int(np.where(reached >= 0, reached, np.iinfo(np.int64).max).argmin())
    final = np.nan_to_num(np.asarray(losses)[:, -1], nan=np.inf)
    return int(final.argmin())


def _thin(values: np.ndarray, limit: int = 1000) -> tuple[list, list]:
    """(steps, values) at every step early on, then log-spaced: the zig-zags of the
    first steps stay visible, long runs stay small."""
    n = len(values)
    keep = np.unique(np.concatenate([np.arange(min(n, limit // 2)),
                                     np.geomspace(1, n, limit // 2).astype(int) - 1]))
    return keep.tolist(), np.asarray(values)[keep].tolist()


def optimizers_for(cfg: dict, which: str) -> list[str]:
    return [n for n in cfg["optimizers"] if not (which == "rosenbrock" and n == "kfac")]


# -------------------------------------------------------------- the study ---

def learning_rate_grid(cfg: dict, which: str, name: str) -> np.ndarray:
    low, high = cfg[which]["learning_rates"][name]
    return np.geomspace(low, high, cfg["num_learning_rates"])


def run_one(cfg: dict, which: str, name: str) -> dict:
    """One optimizer on one problem: the learning-rate grid, the best run's steps to
    tolerance, final loss and (thinned) trajectory."""
    loss_fn, batch, apply_fn, start = problem(cfg, which, copies(name))
    lrs = learning_rate_grid(cfg, which, name)
    points, losses = jax.device_get(trajectories(
        name, lrs, cfg["hyper"][name], loss_fn, batch, start, cfg[which]["steps"],
        apply_fn))
    tol = cfg[which]["tolerance"]
    i = best(lrs, losses, tol)
    reached = steps_to(losses, tol)
    return {"learning_rate": float(lrs[i]), "steps_to_tolerance": int(reached[i]),
            "final_loss": float(losses[i, -1]),
            "grid": {"learning_rates": lrs.tolist(), "steps_to_tolerance": reached.tolist(),
                     "final_loss": [float(v) for v in losses[:, -1]]},
            "steps": _thin(losses[i])[0], "path": _thin(points[i])[1],
            "loss": _thin(losses[i])[1]}


def run(cfg: dict, run_dir: Path, log) -> None:
    for which in PROBLEMS:
        for name in optimizers_for(cfg, which):
            out = studies.piece(run_dir, f"{which}/{name}",
                                lambda: run_one(cfg, which, name), log)
            log(f"{which} {name}: lr {out['learning_rate']:.3g}, "
                f"steps to {cfg[which]['tolerance']:g}: {out['steps_to_tolerance']}, "
                f"final loss {out['final_loss']:.3g}")


# ----------------------------------------------------------------- report ---

COLORS = {"sgd": "tab:blue", "momentum": "tab:orange", "adam": "tab:green",
          "lion": "tab:red", "shampoo": "tab:purple", "kfac": "tab:brown"}


def _panel(ax, cfg, which, results):
    loss_fn, batch, _, _ = problem(cfg, which)
    paths = [np.asarray(r["path"]) for r in results.values()]
    pts = np.concatenate(paths + [np.asarray([cfg[which]["start"]])])
    lo, hi = np.percentile(pts, 1, axis=0), np.percentile(pts, 99, axis=0)
    if which == "rosenbrock":
        lo, hi = np.minimum(lo, [-1.6, -0.4]), np.maximum(hi, [1.4, 1.6])
    pad = 0.15 * (hi - lo) + 1e-3
    us = np.linspace(lo[0] - pad[0], hi[0] + pad[0], 200)
    vs = np.linspace(lo[1] - pad[1], hi[1] + pad[1], 200)
    grid = jnp.stack(jnp.meshgrid(jnp.asarray(us), jnp.asarray(vs), indexing="xy"), -1)
    z = jax.vmap(jax.vmap(lambda w: loss_fn(as_params(w), batch)))(grid)
    z = np.asarray(z) + 1e-8
    levels = np.geomspace(z.min(), z.max(), 16)
    ax.contourf(us, vs, z, levels=levels, norm=matplotlib.colors.LogNorm(), cmap="Greys_r", alpha=0.8)
    ax.contour(us, vs, z, levels=levels, colors="white", linewidths=0.4)
    for name, r in results.items():
        p = np.asarray(r["path"])
        n = r["steps_to_tolerance"]
        label = f"{name} (η={r['learning_rate']:.2g}, " + (
            f"{n} steps)" if n >= 0 else "not reached)")
        ax.plot(p[:, 0], p[:, 1], color=COLORS[name], lw=1.3, label=label, alpha=0.9)
    minimum = cfg["quadratic"]["minimum"] if which == "quadratic" else [1.0, 1.0]
    ax.plot(*minimum, marker="*", color="gold", ms=14, mec="black", ls="none", zorder=5)
    ax.plot(*cfg[which]["start"], marker="s", color="white", ms=6, mec="black", ls="none",
            zorder=5)
    ax.set_xlim(us[0], us[-1])
    ax.set_ylim(vs[0], vs[-1])
    ax.set_xlabel("w₁")
    ax.set_ylabel("w₂")
    ax.legend(fontsize=7, loc="upper right" if which == "quadratic" else "lower left",
              framealpha=0.85)


def report(run_dir: Path) -> list[str]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    done = studies.load_json(Path(run_dir) / studies.RESULTS, {})
    results = {which: {n: done[f"{which}/{n}"] for n in optimizers_for(cfg, which)
                       if f"{which}/{n}" in done} for which in PROBLEMS}
    q, r = cfg["quadratic"], cfg["rosenbrock"]
    kappa = max(q["eigenvalues"]) / min(q["eigenvalues"])
    fig = Figure(figsize=(10, 7.2), layout="constrained")
    axes = fig.subplots(2, 2, height_ratios=(1.6, 1))
    titles = {"quadratic": f"quadratic, κ = {kappa:g}, rotated {q['angle']:g}°",
              "rosenbrock": f"Rosenbrock, b = {r['b']:g}"}
    for ax, curves, which in zip(axes[0], axes[1], PROBLEMS):
        if results[which]:
            _panel(ax, cfg, which, results[which])
        ax.set_title(titles[which])
        for name, res in results[which].items():
            curves.plot(np.asarray(res["steps"]) + 1, np.maximum(res["loss"], 1e-30),
                        color=COLORS[name], lw=1.1, label=name)
        curves.axhline(cfg[which]["tolerance"], color="black", ls=":", lw=0.8)
        curves.set_xscale("log")
        curves.set_yscale("log")
        curves.set_ylim(bottom=max(1e-16, cfg[which]["tolerance"] * 1e-6))
        curves.set_xlabel("step + 1")
        curves.set_ylabel("loss (tolerance dotted)")
    fig.savefig(Path(run_dir) / "ravine.png", dpi=72)
    lines = ["## The ravine", "",
             f"Best learning rate of a {cfg['num_learning_rates']}-point log grid per "
             f"optimizer; steps until the loss stays below the tolerance to the end of the run "
             f"({q['tolerance']:g} on the quadratic in {q['steps']} steps, "
             f"{r['tolerance']:g} on Rosenbrock in {r['steps']}; — : not reached).", "",
             "| optimizer | quadratic η | steps | final loss | Rosenbrock η | steps | "
             "final loss |", "|---|---|---|---|---|---|---|"]
    for name in cfg["optimizers"]:
        cells = [name]
        for which in PROBLEMS:
            res = results[which].get(name)
            if res is None:
                cells += ["n/a"] * 3
                continue
            n = res["steps_to_tolerance"]
            cells += [f"{res['learning_rate']:.3g}", str(n) if n >= 0 else "—",
                      f"{res['final_loss']:.3g}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "K-FAC preconditions dense layers; Rosenbrock is not one, so it is n/a "
              "there.", "", "![ravine](ravine.png)", ""]
    return lines
