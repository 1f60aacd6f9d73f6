"""Sharp minima can generalize: rescaling a ReLU network moves its sharpness, not its
function (Dinh, Pascanu, Bengio & Bengio 2017, "Sharp Minima Can Generalize For Deep
Nets").

A ReLU is positively homogeneous, relu(αz) = α relu(z) for α > 0, so multiplying the
layer that feeds hidden layer `layer` (weights and bias) by α and the weights that read
it by 1/α (`ls.rescale_relu`) leaves every output unchanged. Curvature does change. With
w' = D w, D = α on the incoming parameters, 1/α on the outgoing weights and 1 elsewhere,
the rescaled loss is L'(w') = L(D⁻¹ w'), so its Hessian is exactly

    H_α = D⁻¹ H D⁻¹:

the incoming block is scaled by α⁻², the outgoing block by α², the cross blocks not at
all. Hence α² λ_max(H_oo) ≤ λ_max(H_α) and α⁻² λ_max(H_ii) ≤ λ_max(H_α), and (when
λ_max(H) > 0) λ_max(H_α) ≤ max(α², α⁻²) λ_max(H); as α → ∞, λ_max(H_α) / α² →
λ_max(H_oo), the top eigenvalue of the outgoing weights' own block. So λ_max grows like
α² for large α (and like α⁻² for small α), with a constant set by one block rather than
the whole Hessian: "λ_max scales by α²" is exact only when the top eigenvector lives in
the outgoing layer. ρ-sharpness (≈ ρ² λ_max / 2 for small ρ) moves with it, while the
adaptive sharpness of ASAM with η = 0, max over ‖ε / |w|‖ ≤ ρ, is exactly invariant: in
the coordinates u = ε / |w| the rescaled loss is the same function of u.

The study trains an MLP on MNIST-1D, then for each α measures the outputs' change, the
loss, λ_max of the rescaled Hessian (Lanczos), the prediction λ_max(D⁻¹ H D⁻¹) from the
unrescaled Hessian, the block bounds, worst-case and adaptive sharpness.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import landscape as ls
from experiments import studies
from experiments.report import Figure
from experiments.schema import check, option
from experiments.train import build_model

NAME = "reparameterization"
SWEEP = False

@dataclass(frozen=True)
class Model:
    """The ReLU MLP."""

    hidden: tuple[int, ...] = option((100, 100), ge=1, doc="hidden widths")


@dataclass(frozen=True)
class Rescale:
    """The rescalings: layers/<layer> (weights and bias) × α, layers/<layer + 1>/kernel
    / α."""

    alphas: tuple[float, ...] = option((0.25, 0.5, 1.0, 2.0, 3.0, 4.0, 8.0), gt=0)
    layer: int = option(0, ge=0, doc="a hidden layer's index")


@dataclass(frozen=True)
class Measure:
    """Curvature and sharpness of each rescaled network."""

    num_examples: int = option(1000, ge=1, doc="training examples measured on")
    chunk_size: int = option(1000, ge=1)
    lanczos_steps: int = option(30, ge=1)
    rho: float = option(0.05, gt=0, doc="worst-case (SAM) radius")
    adaptive_rho: float = option(0.5, gt=0, doc="ASAM radius, η = 0")
    ascent_steps: int = option(20, ge=1)
    seed: int = option(0, ge=0, le=2**32 - 1)


@dataclass(frozen=True)
class Config(studies.Study):
    """A trained ReLU MLP on MNIST-1D, rescaled by each α and measured."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    data: studies.MNIST1D = None
    model: Model = None
    train: studies.Train = None
    rescale: Rescale = None
    measure: Measure = None

    def check(self, where):
        super().check(where)
        hidden = self.model.hidden
        studies.nonempty(self.model, "model", "hidden")
        studies.nonempty(self.rescale, "rescale", "alphas")
        check(self.rescale.layer < len(hidden), "rescale.layer must be a hidden layer "
              f"index in 0..{len(hidden) - 1}, got {self.rescale.layer}")
        studies.check_batch(self.data, self.train)
        check(self.measure.num_examples <= self.data.num_train,
              "measure.num_examples must not exceed data.num_train")


# ---------------------------------------------------------------- pieces ---

def setup(cfg: dict):
    """`(apply_fn, loss_fn, init_params, train, test)` of the configured MLP on MNIST-1D."""
    train, test = studies.mnist1d(cfg["data"]["num_train"], cfg["data"]["num_test"])
    model = build_model({"name": "mlp", "hidden": cfg["model"]["hidden"],
                         "activation": "relu"}, train[0].shape[1], 10)
    params = model.init(jax.random.key(cfg["train"]["seed"]))

    def loss_fn(p, batch):
        return ls.cross_entropy(model.apply_fn(p, batch[0]), batch[1])

    return model.apply_fn, loss_fn, params, train, test


def train_model(cfg: dict, loss_fn, params, train):
    return studies.train_configured(cfg, loss_fn, params, train).params


def layer_pair(layer: int) -> tuple[str, str]:
    """(incoming, outgoing) paths of hidden layer `layer` of the MLP's `layers` list."""
    return f"layers/{layer}", f"layers/{layer + 1}/kernel"


def rescale(params, alpha: float, layer: int):
    incoming, outgoing = layer_pair(layer)
    return ls.rescale_relu(params, alpha, incoming=incoming, outgoing=outgoing)


def scale_pair(v, a, layer: int):
    """D_a v: the incoming leaves of hidden layer `layer` times a, the outgoing weights
    divided by a (what `rescale` does, written for traced a)."""
    v = jax.tree.map(lambda x: x, v)   # fresh containers
    v["layers"][layer] = jax.tree.map(lambda x: x * a, v["layers"][layer])
    v["layers"][layer + 1]["kernel"] = v["layers"][layer + 1]["kernel"] / a
    return v


def predicted_operator(hessian, alpha, layer: int) -> ls.LinearOperator:
    """v ↦ D⁻¹ H D⁻¹ v from the unrescaled Hessian H: the exact Hessian after rescaling."""
    def matvec(v):
        return scale_pair(hessian.matvec(scale_pair(v, 1.0 / alpha, layer)), 1.0 / alpha,
                          layer)

    return ls.LinearOperator(matvec, hessian.params)


def top(op, cfg) -> float:
    return float(_top(op, cfg["measure"]["seed"], min(cfg["measure"]["lanczos_steps"],
                                                       op.size)))


def _top(op, seed, num_steps):
    return ls.eigenvalues(op, k=1, key=jax.random.key(seed), num_steps=num_steps).values[0]


@functools.partial(jax.jit, static_argnames=("layer", "seed", "num_steps"))
def _predicted_top(hessian, alpha, *, layer, seed, num_steps):
    # H and α are traced here, so one program serves every α and no array of H is
    # folded into it as a constant.
    return _top(predicted_operator(hessian, alpha, layer), seed, num_steps)


def blocks(cfg, loss_fn, params, batch) -> dict:
    """λ_max of the whole Hessian and of its incoming and outgoing diagonal blocks."""
    incoming, outgoing = layer_pair(cfg["rescale"]["layer"])
    h = ls.hessian(loss_fn, params, batch, chunk_size=cfg["measure"]["chunk_size"])
    return {"lambda_max": top(h, cfg),
            "lambda_incoming": top(ls.restrict(h, lambda p, _: p.startswith(incoming + "/")),
                                   cfg),
            "lambda_outgoing": top(ls.restrict(h, lambda p, _: p == outgoing), cfg)}


def measure(cfg, apply_fn, loss_fn, params, batch, test_inputs, alpha: float) -> dict:
    ms, layer = cfg["measure"], cfg["rescale"]["layer"]
    key = jax.random.key(ms["seed"])
    p = rescale(params, alpha, layer)
    out0, out = apply_fn(params, test_inputs), apply_fn(p, test_inputs)
    chunk = ms["chunk_size"]
    h = ls.hessian(loss_fn, p, batch, chunk_size=chunk)
    h1 = ls.hessian(loss_fn, params, batch, chunk_size=chunk)
    wc = ls.sharpness.worst_case(loss_fn, p, batch, key=key, rho=ms["rho"],
                                 num_steps=ms["ascent_steps"], chunk_size=chunk)
    ad = ls.sharpness.adaptive(loss_fn, p, batch, key=key, rho=ms["adaptive_rho"], eta=0.0,
                               num_steps=ms["ascent_steps"], chunk_size=chunk)
    return {"alpha": alpha,
            "output_change": float(jnp.max(jnp.abs(out - out0)) / jnp.max(jnp.abs(out0))),
            "loss": float(loss_fn(p, batch)),
            "parameter_norm": float(jnp.sqrt(sum(jnp.sum(a ** 2) for a in jax.tree.leaves(p)))),
            "lambda_max": top(h, cfg),
            "lambda_max_predicted": float(_predicted_top(
                h1, jnp.float32(alpha), layer=layer, seed=ms["seed"],
                num_steps=min(ms["lanczos_steps"], h1.size))),
            "worst_case": float(wc.value), "adaptive": float(ad.value)}


def run(cfg: dict, run_dir: Path, log) -> None:
    apply_fn, loss_fn, init, train, test = setup(cfg)
    params = studies.array_piece(run_dir, "params", lambda: train_model(
        cfg, loss_fn, init, train), init, log)
    n = cfg["measure"]["num_examples"]
    batch = (train[0][:n], train[1][:n])

    def trained():
        acc = lambda b: float(ls.accuracy(apply_fn(params, b[0]), b[1]))  # noqa: E731
        return {"train_loss": float(loss_fn(params, train)), "train_accuracy": acc(train),
                "test_loss": float(loss_fn(params, test)), "test_accuracy": acc(test)}

    info = studies.piece(run_dir, "trained", trained, log)
    log(f"trained: train loss {info['train_loss']:.3f}, test accuracy "
        f"{info['test_accuracy']:.3f}")
    b = studies.piece(run_dir, "blocks", lambda: blocks(cfg, loss_fn, params, batch), log)
    log(f"λ_max {b['lambda_max']:.4g}; incoming block {b['lambda_incoming']:.4g}, "
        f"outgoing block {b['lambda_outgoing']:.4g}")
    for alpha in cfg["rescale"]["alphas"]:
        r = studies.piece(run_dir, f"alpha={float(alpha):g}", lambda: measure(
            cfg, apply_fn, loss_fn, params, batch, test[0], float(alpha)), log)
        log(f"α = {alpha:g}: output change {r['output_change']:.1e}, λ_max "
            f"{r['lambda_max']:.4g} (predicted {r['lambda_max_predicted']:.4g}), "
            f"worst-case {r['worst_case']:.4g}, adaptive {r['adaptive']:.4g}")


# ----------------------------------------------------------------- report ---

def rows(run_dir: Path) -> tuple[dict, dict, list[dict]]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    done = studies.load_json(Path(run_dir) / studies.RESULTS, {})
    measured = [done[k] for k in (f"alpha={float(a):g}" for a in cfg["rescale"]["alphas"])
                if k in done]
    return cfg, done, sorted(measured, key=lambda r: r["alpha"])


def figure(cfg: dict, b: dict, measured: list[dict], one: dict, path: Path) -> None:
    """λ_max against α with its predictions and bounds; sharpness relative to α = 1."""
    a = np.array([r["alpha"] for r in measured])
    lam = np.array([r["lambda_max"] for r in measured])
    fig = Figure(figsize=(10.5, 4.0), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    grid = np.geomspace(a.min(), a.max(), 100)
    ax1.plot(a, lam, "o", color="black", label="λ_max(H_α), measured", zorder=3)
    ax1.plot(a, [r["lambda_max_predicted"] for r in measured], "-", color="tab:blue",
             label="λ_max(D⁻¹HD⁻¹) from H at α = 1")
    ax1.plot(grid, grid ** 2 * b["lambda_outgoing"], "--", color="tab:orange",
             label="α² λ_max(H_out,out)")
    ax1.plot(grid, grid ** -2.0 * b["lambda_incoming"], "--", color="tab:green",
             label="α⁻² λ_max(H_in,in)")
    ax1.plot(grid, np.maximum(grid ** 2, grid ** -2.0) * b["lambda_max"], ":",
             color="gray", label="max(α², α⁻²) λ_max(H)")
    ax1.set_xscale("log", base=2)
    ax1.set_yscale("log")
    ax1.set_xlabel("α (incoming × α, outgoing weights × 1/α)")
    ax1.set_ylabel("top Hessian eigenvalue")
    ax1.legend(fontsize=7)
    ax1.set_title("curvature of the same function")
    ax2.plot(a, [r["worst_case"] / one["worst_case"] for r in measured], "o-",
             color="tab:red", label=f"worst-case sharpness, ρ = {cfg['measure']['rho']:g}")
    ax2.plot(a, [r["adaptive"] / one["adaptive"] for r in measured], "s-",
             color="tab:purple", label=f"adaptive sharpness (η = 0), ρ = "
                                       f"{cfg['measure']['adaptive_rho']:g}")
    ax2.plot(a, lam / one["lambda_max"], "^:", color="black", label="λ_max")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.set_xlabel("α")
    ax2.set_ylabel(f"relative to α = {one['alpha']:g}")
    ax2.legend(fontsize=7)
    worst = max(r["output_change"] for r in measured)
    ax2.set_title(f"outputs change by at most {worst:.1e} (relative)")
    fig.savefig(path, dpi=90)


def report(run_dir: Path) -> list[str]:
    cfg, done, measured = rows(run_dir)
    if not measured or "blocks" not in done:
        return ["No rescaling measured yet."]
    b = done["blocks"]
    one = min(measured, key=lambda r: abs(np.log(r["alpha"])))
    figure(cfg, b, measured, one, Path(run_dir) / "reparameterization.png")
    tr = done.get("trained", {})
    lines = ["## Rescaling a trained ReLU network", "",
             f"MLP {cfg['model']['hidden']} on MNIST-1D, {cfg['train']['steps']} steps of "
             f"{cfg['train']['optimizer']}: train loss {tr.get('train_loss', float('nan')):.3f}"
             f", test accuracy {tr.get('test_accuracy', float('nan')):.3f}. Hidden layer "
             f"{cfg['rescale']['layer']} rescaled; measures on "
             f"{cfg['measure']['num_examples']} training examples. λ_max at α = 1: "
             f"{b['lambda_max']:.4g}; incoming block {b['lambda_incoming']:.4g}, outgoing "
             f"block {b['lambda_outgoing']:.4g}.", "",
             "| α | max output change (rel.) | loss | λ_max | predicted λ_max(D⁻¹HD⁻¹) | "
             "λ_max / λ_max(α=1) | α² | worst-case | adaptive (η=0) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
        lines.append(
            f"| {r['alpha']:g} | {r['output_change']:.1e} | {r['loss']:.5f} | "
            f"{r['lambda_max']:.4g} | {r['lambda_max_predicted']:.4g} | "
            f"{r['lambda_max'] / one['lambda_max']:.3g} | {r['alpha'] ** 2:.3g} | "
            f"{r['worst_case']:.4g} | {r['adaptive']:.4g} |")
    lines += ["", "![rescaling](reparameterization.png)", ""]
    return lines
