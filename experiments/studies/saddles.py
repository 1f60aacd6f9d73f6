"""Saddles dominate: the critical points of a network's loss with high loss are saddles.

Dauphin et al. 2014 ("Identifying and attacking the saddle point problem in
high-dimensional non-convex optimization") found, for small networks on MNIST and
CIFAR-10, that critical points with a high training error have many descent directions
(a large index, the fraction of negative Hessian eigenvalues) and that the index falls
towards zero as the error approaches that of the minima; Pennington & Bahri 2017 predict
index ∝ (ε − ε_c)^{3/2} near the minimum's loss ε_c. So a low-loss critical point is
very likely a minimum and the high-loss ones are saddles, not bad local minima.

Here: a one-hidden-layer tanh MLP on a subset of MNIST-1D (square loss on one-hot
targets plus a small L2 term, as smooth as the finder needs) is trained by full-batch
gradient descent; points along that trajectory, and random perturbations of them, start
`ls.critical_points` (Levenberg-Marquardt on the gradient map), and each point found gets
its loss, gradient norm and exact (dense) index. Only points whose gradient norm fell
below `tol` count as critical points; the others are shown but kept apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import jax.flatten_util
import optax

import landscape as ls
from experiments import studies
from experiments.loop import fit
from experiments.report import Figure
from experiments.schema import option

NAME = "saddles"
SWEEP = False

@dataclass(frozen=True)
class Finder:
    """`ls.critical_points` from each start; converged: ‖∇L‖ <= tol_relative × ‖∇L‖ at
    the initialization (3.09 by default)."""

    method: Literal[ls.critical.METHODS] = "gauss_newton"
    steps: int = option(150, ge=1)
    cg_steps: int = option(50, ge=1)
    tol_relative: float = option(1e-3, gt=0)
    damping: float = option(1e-3, gt=0)
    index_rtol: float = option(1e-3, gt=0)


@dataclass(frozen=True)
class Config(studies.Study):
    """Critical points of a small tanh MLP found from points along its training
    trajectory."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    num_examples: int = option(256, ge=1, le=studies.MNIST1D_TRAIN,
                               doc="MNIST-1D training examples (standardized inputs)")
    hidden: int = option(10, ge=1)
    weight_decay: float = option(1e-2, ge=0, doc="½·wd·‖θ‖² added to the loss")
    learning_rate: float = option(0.5, gt=0, doc="full-batch gradient descent for the "
                                  "trajectory")
    train_steps: int = option(3000, ge=1, le=10**9)
    checkpoints: int = option(8, ge=1, doc="starts along the trajectory (log-spaced "
                              "steps)")
    perturbations: int = option(1, ge=0, doc="extra starts per checkpoint ...")
    perturb_scale: float = option(0.5, gt=0, doc="... θ + scale · rms(θ) · N(0, I)")
    seed: int = option(0, ge=0, le=2**32 - 1)
    finder: Finder = None


def init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"kernel": jax.random.normal(k, (a, b)) / math.sqrt(a), "bias": jnp.zeros(b)}
            for k, (a, b) in zip(keys, zip(sizes[:-1], sizes[1:]))]


def apply(params, x):
    h = x
    for p in params[:-1]:
        h = jnp.tanh(h @ p["kernel"] + p["bias"])
    return h @ params[-1]["kernel"] + params[-1]["bias"]


def make_loss(weight_decay: float):
    def loss_fn(params, batch):
        x, y = batch
        misfit = ls.mse(apply(params, x), jax.nn.one_hot(y, 10))
        return misfit + 0.5 * weight_decay * sum(jnp.sum(v ** 2)
                                                 for v in jax.tree.leaves(params))
    return loss_fn


def checkpoint_steps(cfg: dict) -> list[int]:
    t = np.unique(np.round(np.geomspace(1, cfg["train_steps"] + 1, cfg["checkpoints"]))) - 1
    return [int(s) for s in t]


def starts(cfg: dict, loss_fn, batch):
    """Points along a full-batch GD trajectory and their perturbations, stacked, with
    their descriptions."""
    sizes = [batch[0].shape[1], cfg["hidden"], 10]
    params = init(jax.random.key(cfg["seed"]), sizes)
    keep = checkpoint_steps(cfg)
    gd = optax.sgd(cfg["learning_rate"])
    points, where, t = [], [], 0
    for s in keep:
        # Plain GD keeps no state, so segments of the run join into one trajectory.
        params = fit(loss_fn, params, gd, batch, steps=s - t, key=jax.random.key(0),
                     scan=True).params
        t = s
        points.append(params)
        where.append({"step": s, "perturbed": False})
    key = jax.random.key(cfg["seed"] + 1)
    for i, base in enumerate(list(points)):
        flat, unravel = jax.flatten_util.ravel_pytree(base)
        rms = jnp.sqrt(jnp.mean(flat ** 2))
        for j in range(cfg["perturbations"]):
            k = jax.random.fold_in(key, i * 1000 + j)
            noise = cfg["perturb_scale"] * rms * jax.random.normal(k, flat.shape)
            points.append(unravel(flat + noise))
            where.append({"step": where[i]["step"], "perturbed": True})
    return points, where


def tolerance(cfg: dict, loss_fn, batch) -> float:
    """The absolute gradient-norm tolerance: `tol_relative` × ‖∇L‖ at initialization."""
    p0 = init(jax.random.key(cfg["seed"]), [batch[0].shape[1], cfg["hidden"], 10])
    g0 = jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(p0, batch))[0]
    return float(cfg["finder"]["tol_relative"] * jnp.linalg.norm(g0))


def find(cfg: dict, loss_fn, point, batch, tol: float) -> dict:
    f = cfg["finder"]
    stacked = jax.tree.map(lambda x: x[None], point)
    cp = ls.critical_points(loss_fn, stacked, batch, steps=f["steps"], tol=tol,
                            method=f["method"], cg_steps=f["cg_steps"],
                            damping=f["damping"], index="dense", index_rtol=f["index_rtol"])
    cp = jax.device_get(jax.tree.map(lambda x: x[0], cp))
    return {"loss": float(cp.loss), "grad_norm": float(cp.grad_norm),
            "converged": bool(cp.converged), "steps": int(cp.steps),
            "index": float(cp.index.negative), "near_zero": float(cp.index.near_zero),
            "start_loss": float(loss_fn(point, batch)), "tol": tol,
            "start_grad_norm": float(jnp.linalg.norm(
                jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(point, batch))[0]))}


def run(cfg: dict, run_dir: Path, log) -> None:
    batch = studies.standardized_mnist1d(cfg["num_examples"])
    loss_fn = make_loss(cfg["weight_decay"])
    points, where = starts(cfg, loss_fn, batch)
    tol = tolerance(cfg, loss_fn, batch)
    log(f"{len(points)} starts; finding critical points (‖∇L‖ <= {tol:.3g})")
    for i, (point, w) in enumerate(zip(points, where)):
        out = studies.piece(run_dir, f"start/{i}", lambda: {**w, **find(cfg, loss_fn, point,
                                                                   batch, tol)}, log)
        log(f"start {i} (step {w['step']}{', perturbed' if w['perturbed'] else ''}): "
            f"loss {out['loss']:.4f}, |g| {out['grad_norm']:.2e}"
            f"{'' if out['converged'] else ' (not converged)'}, index {out['index']:.4f}")


def rank_correlations(points: list[dict]) -> dict:
    """Kendall τ and Spearman ρ (scipy.stats) of the index against the loss."""
    from scipy import stats

    if len(points) < 3:
        return {"n": len(points), "kendall": float("nan"), "spearman": float("nan")}
    loss = [p["loss"] for p in points]
    index = [p["index"] for p in points]
    return {"n": len(points), "kendall": float(stats.kendalltau(loss, index).statistic),
            "spearman": float(stats.spearmanr(loss, index).statistic)}


def points_of(run_dir: Path) -> list[dict]:
    res = studies.results(run_dir)
    return [res[k] for k in sorted(res, key=lambda k: int(k.split("/")[1]))
            if k.startswith("start/")]


def report(run_dir: Path) -> list[str]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    pts = points_of(run_dir)
    conv = [p for p in pts if p["converged"]]
    fig = Figure(figsize=(5.6, 4.2), layout="constrained")
    ax = fig.add_subplot()
    tol = pts[0]["tol"] if pts else float("nan")
    for group, style in ((conv, dict(c="tab:blue", label=f"critical (|g| ≤ {tol:.2g})")),
                         ([p for p in pts if not p["converged"]],
                          dict(facecolors="none", edgecolors="tab:gray",
                               label="not converged"))):
        if group:
            ax.scatter([p["loss"] for p in group], [100 * p["index"] for p in group],
                       s=28, **style)
    ax.set_xlabel("training loss at the point")
    ax.set_ylabel("index (% negative Hessian eigenvalues)")
    ax.set_title(f"Critical points of a 40-{cfg['hidden']}-10 tanh MLP (MNIST-1D)")
    ax.legend(fontsize=8)
    fig.savefig(Path(run_dir) / "saddles.png", dpi=90)

    rc, ra = rank_correlations(conv), rank_correlations(pts)
    f = cfg["finder"]
    lines = ["## Saddles dominate", "",
             f"{len(pts)} starts ({cfg['checkpoints']} points along a gradient-descent "
             f"trajectory, {cfg['perturbations']} perturbation(s) each); finder "
             f"{f['method']}, at most {f['steps']} steps of {f['cg_steps']} CG iterations; "
             f"**{len(conv)} of {len(pts)} converged** (‖∇L‖ ≤ {tol:.3g}, which is "
             f"{f['tol_relative']:g} × ‖∇L‖ at the initialization; the search stops "
             "there).", "",
             "| points | n | Kendall τ (index, loss) | Spearman ρ |", "|---|---|---|---|",
             f"| converged | {rc['n']} | {rc['kendall']:.3f} | {rc['spearman']:.3f} |",
             f"| all | {ra['n']} | {ra['kendall']:.3f} | {ra['spearman']:.3f} |", "",
             "| start | from step | start loss | start ‖∇L‖ | loss | ‖∇L‖ | converged | index "
             "| near zero |", "|---|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(pts):
        lines.append(f"| {i} | {p['step']}{' (perturbed)' if p['perturbed'] else ''} | "
                     f"{p['start_loss']:.4f} | {p['start_grad_norm']:.3g} | {p['loss']:.4f} | {p['grad_norm']:.2e} | "
                     f"{'yes' if p['converged'] else 'no'} | {p['index']:.4f} | "
                     f"{p['near_zero']:.4f} |")
    lines += ["", "![index against loss](saddles.png)", ""]
    return lines
