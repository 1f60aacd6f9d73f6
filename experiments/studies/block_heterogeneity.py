"""Block heterogeneity of the Hessian (Zhang et al. 2024, "Why Transformers Need Adam: A
Hessian Perspective", arXiv:2402.16788).

Claim: at initialization the Hessian spectra of a transformer's parameter blocks differ
much more from block to block than a CNN's do, and that heterogeneity, measured by JS⁰
(the mean Jensen–Shannon distance between the blocks' spectral densities), marks the
models where SGD falls behind Adam: a large JS⁰ goes with a large SGD-vs-Adam gap, a
small one with SGD close to Adam.

The study builds a CNN and a transformer on MNIST-1D, estimates each layer's Hessian
spectral density at initialization (`ls.per_block(..., density=True)`, stochastic
Lanczos quadrature on each diagonal block H_bb), and computes JS⁰
(`ls.block_heterogeneity`). It then trains each model with SGD (heavy-ball momentum)
and with Adam over a small learning-rate grid each, and compares the best final
training loss of the two: the gap is SGD's minus Adam's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

import landscape as ls
import transforms as tx
from experiments import studies
from experiments.loop import fit
from experiments.report import Figure
from experiments.schema import check, option
from experiments.train import build_model

NAME = "block_heterogeneity"
SWEEP = False
MODELS = ("cnn", "transformer")


@dataclass(frozen=True)
class CNN:
    """`experiments.models` CNN: convolutions, global pooling, a linear head."""

    channels: tuple[int, ...] = option((16, 32, 32), doc="per conv layer")
    kernel_size: int = option(5, ge=1)

    def check(self, where):
        studies.nonempty(self, where, "channels")
        check(all(c >= 1 for c in self.channels), f"{where}.channels must be positive")


@dataclass(frozen=True)
class Transformer:
    """`experiments.models` transformer (pre-LayerNorm) over patches of the signal."""

    embed_dim: int = option(64, ge=1)
    num_blocks: int = option(2, ge=1)
    num_heads: int = option(4, ge=1)
    patch_size: int = option(4, ge=1)

    def check(self, where):
        check(self.embed_dim % self.num_heads == 0,
              f"{where}.num_heads must divide {where}.embed_dim ({self.embed_dim})")


@dataclass(frozen=True)
class Spectrum:
    """Each layer's Hessian density at initialization (one block per layer)."""

    num_examples: int = option(512, ge=1, doc="training examples the Hessian is taken on")
    chunk_size: int = option(256, ge=1)
    probes: int = option(2, ge=1, doc="SLQ probes per block")
    lanczos_steps: int = option(30, ge=2, doc="SLQ Lanczos steps per probe")
    seed: int = option(0, ge=0, le=2**32 - 1, doc="initialization and probes")


@dataclass(frozen=True)
class Compare:
    """SGD against Adam: the best final training loss over each learning-rate grid."""

    sgd: str = option("momentum", doc="the SGD-family optimizer (momentum 0.9)")
    sgd_learning_rates: tuple[float, ...] = option((0.01, 0.03, 0.1))
    adam_learning_rates: tuple[float, ...] = option((3e-4, 1e-3, 3e-3))
    steps: int = option(1500, ge=1, le=10**9)
    batch_size: int = option(128, ge=1)
    final_window: int = option(100, ge=1, doc="final loss: mean of the last minibatches")

    def check(self, where):
        studies.nonempty(self, where, "sgd_learning_rates", "adam_learning_rates")
        check(all(lr > 0 for lr in self.sgd_learning_rates + self.adam_learning_rates),
              f"{where} learning rates must be positive")
        check(self.final_window <= self.steps,
              f"{where}.final_window must not exceed {where}.steps")
        try:
            tx.make(self.sgd, learning_rate=0.1)
        except (ValueError, TypeError) as e:
            check(False, f"{where}.sgd: {str(e).splitlines()[0]}")


@dataclass(frozen=True)
class Config(studies.Study):
    """A CNN and a transformer on MNIST-1D: blockwise Hessian spectra at initialization,
    JS⁰, and the SGD-vs-Adam gap."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    data: studies.MNIST1D = None
    cnn: CNN = None
    transformer: Transformer = None
    spectrum: Spectrum = None
    compare: Compare = None

    def check(self, where):
        super().check(where)
        check(self.spectrum.num_examples <= self.data.num_train,
              "spectrum.num_examples must not exceed data.num_train")
        check(self.compare.batch_size <= self.data.num_train,
              "compare.batch_size must not exceed data.num_train")


# ---------------------------------------------------------------- pieces ---

def setup(cfg: dict, model: str):
    """`(apply_fn, loss_fn, init_params, train, test)` of one of the two models."""
    train, test = studies.mnist1d(cfg["data"]["num_train"], cfg["data"]["num_test"])
    table = {"name": model, **{k: list(v) if isinstance(v, (list, tuple)) else v
                               for k, v in cfg[model].items()}}
    if model == "cnn":
        table["activation"] = "relu"
    m = build_model(table, train[0].shape[1], 10)

    def loss_fn(p, batch):
        return ls.cross_entropy(m.apply_fn(p, batch[0]), batch[1])

    return m.apply_fn, loss_fn, m.init(jax.random.key(cfg["spectrum"]["seed"])), train, test


def spectrum(cfg: dict, loss_fn, params, train) -> dict:
    """Per-layer SLQ densities of H at `params`, JS⁰ and the pairwise distances."""
    s = cfg["spectrum"]
    batch = jax.tree.map(lambda a: a[: s["num_examples"]], train)
    H = ls.hessian(loss_fn, params, batch, chunk_size=s["chunk_size"])
    rep = ls.per_block(H, key=jax.random.key(s["seed"] + 1), density=True,
                       density_probes=s["probes"], density_steps=s["lanczos_steps"],
                       trace_probes=8)
    het = ls.block_heterogeneity(rep)
    return {"js0": float(het.js0), "names": list(het.names),
            "distances": np.asarray(het.distances).tolist(),
            "grid": np.asarray(het.grid).tolist(),
            "probabilities": np.asarray(het.probabilities).tolist(),
            "sizes": [rep[n].size for n in het.names],
            "lambda_max": [float(rep[n].lambda_max) for n in het.names],
            "trace": [float(rep[n].trace) for n in het.names]}


def train_one(cfg: dict, apply_fn, loss_fn, params, train, test, optimizer: str,
              lr: float) -> dict:
    c = cfg["compare"]
    out = fit(loss_fn, params, tx.make(optimizer, learning_rate=lr), train,
              steps=c["steps"], batch_size=c["batch_size"],
              key=jax.random.key(cfg["spectrum"]["seed"] + 2))
    losses = np.asarray(out.losses, np.float64)
    final = float(np.mean(losses[-c["final_window"]:]))
    window = max(1, len(losses) // 50)
    return {"optimizer": optimizer, "learning_rate": lr,
            "final_loss": final if np.isfinite(final) else None,
            "test_accuracy": float(ls.accuracy(apply_fn(out.params, test[0]), test[1])),
            "curve": [float(losses[i:i + window].mean())
                      for i in range(0, len(losses), window)]}


def run(cfg: dict, run_dir: Path, log) -> None:
    c = cfg["compare"]
    for model in MODELS:
        apply_fn, loss_fn, init, train, test = setup(cfg, model)
        sp = studies.piece(run_dir, f"spectrum/{model}",
                           lambda: spectrum(cfg, loss_fn, init, train), log)
        log(f"{model}: JS0 = {sp['js0']:.3f} over {len(sp['names'])} blocks")
        grid = [(c["sgd"], lr) for lr in c["sgd_learning_rates"]] + [
            ("adam", lr) for lr in c["adam_learning_rates"]]
        for opt, lr in grid:
            r = studies.piece(run_dir, f"train/{model}/{opt}/{lr:g}", lambda opt=opt, lr=lr:
                              train_one(cfg, apply_fn, loss_fn, init, train, test, opt, lr),
                              log)
            log(f"{model} {opt} η = {lr:g}: final train loss {r['final_loss']}")


# ----------------------------------------------------------------- report ---

def summary(done: dict) -> dict:
    """Per model: JS⁰, the best (lowest) final training loss of SGD and of Adam over
    their grids (with the learning rate and test accuracy), and the gap SGD − Adam."""
    out = {}
    for model in MODELS:
        if f"spectrum/{model}" not in done:
            continue
        runs = [v for k, v in done.items() if k.startswith(f"train/{model}/")]
        row = {"js0": done[f"spectrum/{model}"]["js0"],
               "blocks": len(done[f"spectrum/{model}"]["names"])}
        for family in ("sgd", "adam"):
            mine = [r for r in runs if (r["optimizer"] == "adam") == (family == "adam")
                    and r["final_loss"] is not None]
            best = min(mine, key=lambda r: r["final_loss"]) if mine else None
            row[family] = best
        row["gap"] = (row["sgd"]["final_loss"] - row["adam"]["final_loss"]
                      if row["sgd"] and row["adam"] else None)
        out[model] = row
    return out


def figure(done: dict, path: Path, dpi: int = 90) -> None:
    models = [m for m in MODELS if f"spectrum/{m}" in done]
    fig = Figure(figsize=(11, 3.6 * len(models)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(len(models), 2))
    for row, model in zip(axes, models):
        sp = done[f"spectrum/{model}"]
        grid = np.asarray(sp["grid"])
        for name, p in zip(sp["names"], sp["probabilities"]):
            row[0].plot(grid, np.maximum(np.asarray(p), 1e-12), lw=1, label=name)
        row[0].set_yscale("log")
        row[0].set_ylim(1e-8, 1)
        row[0].set_xlabel("eigenvalue of H_bb")
        row[0].set_ylabel("density (normalized on the grid)")
        row[0].set_title(f"{model}: per-layer Hessian spectra at init, JS⁰ = "
                         f"{sp['js0']:.3f}", fontsize=10)
        row[0].legend(fontsize=6, ncol=2)
        for key, r in sorted(done.items()):
            if key.startswith(f"train/{model}/"):
                ls_ = "-" if r["optimizer"] == "adam" else "--"
                row[1].plot(np.linspace(0, 1, len(r["curve"])), r["curve"], ls=ls_,
                            label=f"{r['optimizer']} {r['learning_rate']:g}")
        row[1].set_yscale("log")
        row[1].set_xlabel("fraction of training")
        row[1].set_ylabel("train loss (minibatch)")
        row[1].set_title(f"{model}: SGD (dashed) against Adam (solid)", fontsize=10)
        row[1].legend(fontsize=6, ncol=2)
    fig.savefig(path, dpi=dpi)


def report(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    cfg = studies.load_json(run_dir / "config.json")
    done = studies.results(run_dir)
    rows = summary(done)
    if not rows:
        return ["No spectrum computed yet."]
    figure(done, run_dir / "block_heterogeneity.png")
    s, c = cfg["spectrum"], cfg["compare"]

    def best(r):
        return "—" if r is None else (f"{r['final_loss']:.3g} (η {r['learning_rate']:g}, "
                                      f"test acc {r['test_accuracy']:.3f})")

    lines = ["## Block heterogeneity (Zhang et al. 2024)", "",
             f"One block per layer; SLQ ({s['probes']} probes × {s['lanczos_steps']} "
             f"steps) on {s['num_examples']} training examples at initialization; "
             f"{c['steps']} steps of {c['sgd']} and Adam, batch {c['batch_size']}.", "",
             "| model | blocks | JS⁰ | best SGD final loss | best Adam final loss | "
             "gap (SGD − Adam) |", "|---|---|---|---|---|---|"]
    for model, r in rows.items():
        gap = "—" if r["gap"] is None else f"{r['gap']:.3g}"
        lines.append(f"| {model} | {r['blocks']} | {r['js0']:.3f} | {best(r['sgd'])} | "
                     f"{best(r['adam'])} | {gap} |")
    lines += ["", "![spectra and training curves](block_heterogeneity.png)", ""]
    return lines
