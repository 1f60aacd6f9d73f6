"""Vanishing and exploding gradients through depth, at initialization.

Back-propagation multiplies the error signal ∂L/∂z_l by one layer Jacobian Wᵀ·diag(φ')
per layer, so in a deep plain network its norm changes geometrically with depth: it
vanishes towards the input when each factor shrinks it and explodes when each grows it
(Hochreiter 1991; Bengio et al. 1994; Glorot & Bengio 2010). The variance-preserving
initializations (LeCun / Glorot for tanh and linear, He et al. 2015 for ReLU: weight
variance c/fan_in with c = 1 or 2) keep the factor near one; a gain g times that standard
deviation makes it about g per layer. Residual connections h ← h + α φ(W h + b) (He et
al. 2016) give every layer an identity path, so the factor is 1 + O(α) and the signal
neither vanishes nor explodes much over 20 layers when α ~ 1/√depth.

Two curves per network, both through `ls.layer_grad_norms`: the norm of the error signal
‖∂L/∂z_l‖ at each layer's pre-activation (the gradient with respect to a zero offset
added there), and the norm of each layer's parameter gradient ‖∂L/∂(W_l, b_l)‖. The
second is ∂L/∂z_l times the layer's input, and in a plain network the input shrinks or
grows with depth just as the error grows or shrinks: with zero biases and a homogeneous
activation (ReLU, linear) the two cancel and the parameter gradients stay balanced
across layers even while the error signal vanishes (Glorot & Bengio 2010 saw the same).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

import landscape as ls
from experiments import studies
from experiments.report import Figure
from experiments.schema import option

NAME = "gradient_flow"
SWEEP = False
ACTIVATIONS = {"tanh": (jnp.tanh, 1.0), "relu": (jax.nn.relu, 2.0),
               "linear": (lambda z: z, 1.0)}  # φ and the variance-preserving c

Activation = Literal[tuple(ACTIVATIONS)]


@dataclass(frozen=True)
class Config(studies.Study):
    """Per-layer gradient norms at initialization of plain and residual MLPs."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    depth: int = option(20, ge=3, doc="weight layers: input layer, depth − 2 hidden, "
                        "read-out")
    width: int = option(64, ge=1)
    num_examples: int = option(256, ge=1, le=studies.MNIST1D_TRAIN,
                               doc="MNIST-1D training examples (standardized)")
    activations: tuple[Activation, ...] = ("tanh", "relu", "linear")
    gains: tuple[float, ...] = option((0.5, 1.0, 2.0), gt=0,
                                      doc="× the variance-preserving standard deviation")
    skips: tuple[bool, ...] = (False, True)
    branch_scale: float = option(0.0, ge=0, doc="α of the residual branch; 0 means "
                                 "1/√(depth − 2)")
    seed: int = option(0, ge=0, le=2**32 - 1)

    def check(self, where):
        super().check(where)
        studies.nonempty(self, where, "activations", "gains", "skips")


def init(key, sizes, activation: str, gain: float) -> list[dict]:
    """Weights N(0, gain² c / fan_in) (c from the activation), zero biases."""
    c = ACTIVATIONS[activation][1]
    params = []
    for k, (a, b) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        std = gain * math.sqrt(c / a)
        params.append({"kernel": std * jax.random.normal(k, (a, b)), "bias": jnp.zeros(b)})
    return params


def apply(params, x, activation: str, skip: bool, alpha: float, offsets=None):
    """The MLP; `offsets[l]` (zeros) is added to layer l's pre-activation so that the
    gradient with respect to it is the back-propagated error ∂L/∂z_l."""
    phi = ACTIVATIONS[activation][0]
    h = x
    last = len(params) - 1
    for l, p in enumerate(params):
        z = h @ p["kernel"] + p["bias"]
        if offsets is not None:
            z = z + offsets[l]
        if l == last:
            return z
        if skip and 0 < l:  # hidden layers (width → width) are residual blocks
            h = h + alpha * phi(z)
        else:
            h = phi(z)


def alpha_of(cfg: dict) -> float:
    return cfg["branch_scale"] or 1.0 / math.sqrt(cfg["depth"] - 2)


@functools.lru_cache(maxsize=32)
def _norms_program(activation: str, skip: bool, alpha: float):
    """One compiled program per network shape, shared by every gain."""
    def loss(p, b, offsets=None):
        return ls.cross_entropy(apply(p, b[0], activation, skip, alpha, offsets), b[1])

    @jax.jit
    def norms(params, batch):
        offsets = [jnp.zeros((batch[0].shape[0], p["bias"].shape[0])) for p in params]
        return (ls.layer_grad_norms(lambda o, b: loss(params, b, o), offsets, batch),
                ls.layer_grad_norms(loss, params, batch), loss(params, batch))

    return norms


def measure(cfg: dict, activation: str, gain: float, skip: bool, batch) -> dict:
    """Per-layer norms of the error signal and of the parameter gradients."""
    x, _ = batch
    sizes = [x.shape[1]] + [cfg["width"]] * (cfg["depth"] - 1) + [10]
    params = init(jax.random.key(cfg["seed"]), sizes, activation, gain)
    program = _norms_program(activation, skip, alpha_of(cfg))
    errors, grads, value = jax.device_get(program(params, batch))
    as_list = lambda d: [float(v) for v in d.values()]
    return {"error": as_list(errors.norms), "error_ratio": float(errors.ratio),
            "param": as_list(grads.norms), "param_ratio": float(grads.ratio),
            "loss": float(value)}


def key_of(activation: str, gain: float, skip: bool) -> str:
    return f"{activation}/gain={gain:g}/{'skip' if skip else 'plain'}"


def run(cfg: dict, run_dir: Path, log) -> None:
    batch = studies.standardized_mnist1d(cfg["num_examples"])
    for act in cfg["activations"]:
        for gain in cfg["gains"]:
            for skip in cfg["skips"]:
                k = key_of(act, gain, skip)
                out = studies.piece(run_dir, k, lambda: measure(cfg, act, gain, skip, batch), log)
                log(f"{k}: error first/last {out['error_ratio']:.3g}, parameter-gradient "
                    f"first/last {out['param_ratio']:.3g}")


def report(run_dir: Path) -> list[str]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    res = studies.results(run_dir)
    acts = cfg["activations"]
    fig = Figure(figsize=(3.6 * len(acts), 6.2), layout="constrained")
    axes = fig.subplots(2, len(acts), squeeze=False, sharex=True)
    colors = dict(zip(cfg["gains"], ["tab:blue", "tab:green", "tab:red", "tab:purple",
                                     "tab:orange", "tab:brown"]))
    for j, act in enumerate(acts):
        for gain in cfg["gains"]:
            for skip in cfg["skips"]:
                r = res.get(key_of(act, gain, skip))
                if r is None:
                    continue
                style = dict(color=colors.get(gain), ls="--" if skip else "-", lw=1.3,
                             label=f"g = {gain:g}" + (", skip" if skip else ""))
                layers = np.arange(1, len(r["error"]) + 1)
                axes[0, j].plot(layers, r["error"], **style)
                axes[1, j].plot(layers, r["param"], **style)
        axes[0, j].set_title(act)
        axes[1, j].set_xlabel("layer (1 = input side)")
        for i in range(2):
            axes[i, j].set_yscale("log")
    axes[0, 0].set_ylabel("‖∂L/∂z_l‖ (error signal)")
    axes[1, 0].set_ylabel("‖∂L/∂θ_l‖ (parameter gradient)")
    axes[0, -1].legend(fontsize=6)
    fig.savefig(Path(run_dir) / "gradient_flow.png", dpi=90)

    lines = ["## Vanishing and exploding gradients at initialization", "",
             f"{cfg['depth']}-layer MLP of width {cfg['width']} on {cfg['num_examples']} "
             f"MNIST-1D examples; weights N(0, g²·c/fan_in) (c = 2 for ReLU, 1 otherwise), "
             f"zero biases; residual branch scale α = {alpha_of(cfg):.3g}. First/last "
             "layer ratios (≪ 1: vanishing towards the input, ≫ 1: exploding):", "",
             "| activation | g | skips | error signal first/last | parameter gradient "
             "first/last |", "|---|---|---|---|---|"]
    for act in acts:
        for gain in cfg["gains"]:
            for skip in cfg["skips"]:
                r = res.get(key_of(act, gain, skip))
                if r is not None:
                    lines.append(f"| {act} | {gain:g} | {'yes' if skip else 'no'} | "
                                 f"{r['error_ratio']:.3g} | {r['param_ratio']:.3g} |")
    lines += ["", "![gradient flow](gradient_flow.png)", ""]
    return lines
