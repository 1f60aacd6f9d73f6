"""Plateaus: deep linear networks learn a teacher's singular modes one after another.

Saxe, McClelland & Ganguli 2014 ("Exact solutions to the nonlinear dynamics of learning
in deep linear neural networks"): with whitened inputs (Σxx = I) and a teacher map with
singular values s_α, gradient descent on ½‖y − W_N⋯W_1 x‖² from a small "decoupled"
initialization (the end-to-end map starts as ε₀ times the teacher's singular vectors,
spread evenly over the layers) keeps the modes independent. Each mode's strength u_α
(its singular value in the network's map) then follows, with τ = 1/η in steps,

    τ u̇ = N u^{2 − 2/N} (s − u)                               (depth N, balanced layers)

For N = 1 (linear regression) every mode relaxes exponentially with the same time τ: no
plateau. For N = 2 it is the logistic curve, whose half-way time is

    t_½ = τ / (2s) · ln((s − ε₀) / ε₀)  ≈  τ / (2s) · ln(s / ε₀),

so strong modes are learned first, each after a plateau that grows as ln(1/ε₀). For
N >= 3 the same ODE gives t_½ = (τ / N) ∫_{ε₀}^{s/2} du / (u^{2−2/N} (s − u)), which grows
like ε₀^{−(1 − 2/N)} / s: deeper nets from the same small start wait longer. The study
marks these predicted stage times (mode α learned: u_α = s_α / 2) on the measured loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import landscape as ls
from experiments import studies
from experiments.loop import fit
from experiments.report import Figure
from experiments.schema import check, option

NAME = "plateaus"
SWEEP = False

@dataclass(frozen=True)
class Config(studies.Study):
    """Deep linear networks trained by full-batch gradient descent on a linear teacher."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    dim: int = option(8, ge=1, doc="input, hidden and output width")
    singular_values: tuple[float, ...] = option(
        (3.0, 2.0, 1.0, 0.5), gt=0, doc="the teacher's (distinct; the others are 0)")
    num_examples: int = option(64, ge=1, doc="at least dim (whitened inputs)")
    depths: tuple[int, ...] = option((1, 2, 3, 4), ge=1)
    init_strength: float = option(1e-3, gt=0, doc="ε₀: every mode's initial strength")
    learning_rate: float = option(0.01, gt=0)
    steps: int = option(6000, ge=1, le=10**9)
    record_every: int = option(5, ge=1)
    seed: int = option(0, ge=0, le=2**32 - 1)
    random_init: bool = option(True, doc="also train from a random Gaussian "
                               "initialization whose layers have singular values of order "
                               "ε₀^{1/N} (no prediction: the modes start coupled and unequal)")

    def check(self, where):
        super().check(where)
        studies.nonempty(self, where, "singular_values", "depths")
        s = self.singular_values
        check(len(set(s)) == len(s) and len(s) <= self.dim, "singular_values must be "
              f"distinct, at most dim ({self.dim}) of them; got {list(s)}")
        check(self.init_strength < min(s) / 2, "init_strength must be below half the "
                                               "smallest singular value")
        check(self.num_examples >= self.dim, "num_examples must be at least dim (whitened "
                                             "inputs)")


def _orthogonal(rng, n):
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return q * np.sign(np.diag(r))


def problem(cfg: dict):
    """Whitened inputs X (XᵀX / n = I exactly), targets Y = X Tᵀ, and the teacher's
    singular vectors: T = U diag(s) Vᵀ."""
    rng = np.random.default_rng(cfg["seed"])
    d, n = cfg["dim"], cfg["num_examples"]
    frame, _ = np.linalg.qr(rng.normal(size=(n, d)))          # orthonormal columns
    x = math.sqrt(n) * frame
    u, v = _orthogonal(rng, d), _orthogonal(rng, d)
    s = np.zeros(d)
    s[: len(cfg["singular_values"])] = cfg["singular_values"]
    teacher = u @ np.diag(s) @ v.T
    return x, x @ teacher.T, u, v, s


def decoupled_init(cfg: dict, depth: int, u, v, rng):
    """Layers A_1 … A_N (the network computes x ↦ x A_1 ⋯ A_N) whose product is
    ε₀ V Uᵀ, each contributing ε₀^{1/N} per mode, joined by random rotations R_k."""
    d = cfg["dim"]
    a = cfg["init_strength"] ** (1.0 / depth)
    rots = [v] + [_orthogonal(rng, d) for _ in range(depth - 1)] + [u]
    return [a * rots[k] @ rots[k + 1].T for k in range(depth)]


def random_init(cfg: dict, depth: int, rng):
    """Gaussian layers with entries N(0, ε₀^{2/N} / d): singular values of order ε₀^{1/N}."""
    d = cfg["dim"]
    a = cfg["init_strength"] ** (1.0 / depth)
    return [a * rng.normal(size=(d, d)) / math.sqrt(d) for _ in range(depth)]


def product(layers):
    m = layers[0]
    for a in layers[1:]:
        m = m @ a
    return m


def loss_fn(layers, batch):
    x, y = batch
    return ls.mse(x @ product(layers), y)


def train(cfg: dict, depth: int, init: str = "decoupled") -> dict:
    """Full-batch gradient descent; every `record_every` steps the loss and each teacher
    mode's strength u_α = u_αᵀ (A_1⋯A_N)ᵀ v_α."""
    x, y, u, v, s = problem(cfg)
    rng = np.random.default_rng(cfg["seed"] + depth)
    start = (decoupled_init(cfg, depth, u, v, rng) if init == "decoupled"
             else random_init(cfg, depth, rng))
    layers = [jnp.asarray(a, jnp.float32) for a in start]
    batch = (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    k = len(cfg["singular_values"])
    uu, vv = jnp.asarray(u[:, :k], jnp.float32), jnp.asarray(v[:, :k], jnp.float32)
    lr, every = cfg["learning_rate"], cfg["record_every"]

    def record(p):
        m = product(p)
        return loss_fn(p, batch), jnp.einsum("ia,ij,ja->a", vv, m, uu)

    out = fit(loss_fn, layers, optax.sgd(lr), batch, steps=cfg["steps"] // every * every,
              key=jax.random.key(0), scan=True, record=record, record_every=every)
    losses, modes = (np.asarray(a) for a in out.records)
    steps = np.arange(len(losses)) * every
    return {"steps": steps.tolist(), "loss": losses.tolist(), "modes": modes.T.tolist(),
            "stage_times": [stage_time(steps, m, sv) for m, sv in
                            zip(modes.T, cfg["singular_values"])]}


def stage_time(steps, strength, s) -> float | None:
    """First recorded step at which the mode's strength reaches s/2 (linearly
    interpolated between records); None if it never does."""
    strength = np.asarray(strength)
    above = np.nonzero(strength >= s / 2)[0]
    if len(above) == 0:
        return None
    i = int(above[0])
    if i == 0:
        return float(steps[0])
    f = (s / 2 - strength[i - 1]) / (strength[i] - strength[i - 1])
    return float(steps[i - 1] + f * (steps[i] - steps[i - 1]))


def predicted_stage_time(s: float, eps0: float, depth: int, learning_rate: float) -> float:
    """Steps for a mode of strength s to go from ε₀ to s/2 under the balanced ODE
    τ u̇ = N u^{2−2/N} (s − u), τ = 1/η (closed form for N = 1, 2; quadrature above)."""
    tau = 1.0 / learning_rate
    if depth == 1:
        return tau * math.log((s - eps0) / (s / 2))
    if depth == 2:
        return tau / (2 * s) * math.log((s - eps0) / eps0)
    from scipy.integrate import quad

    p = 2.0 - 2.0 / depth
    # substitute u = e^w so the integrand is smooth over the many decades from ε₀
    val, _ = quad(lambda w: math.exp(w) / (math.exp(w) ** p * (s - math.exp(w))),
                  math.log(eps0), math.log(s / 2), limit=200)
    return tau / depth * val


def run(cfg: dict, run_dir: Path, log) -> None:
    for depth in cfg["depths"]:
        out = studies.piece(run_dir, f"depth/{depth}", lambda: train(cfg, depth), log)
        pred = [predicted_stage_time(s, cfg["init_strength"], depth, cfg["learning_rate"])
                for s in cfg["singular_values"]]
        log(f"depth {depth}: stage times {out['stage_times']} (predicted "
            f"{[round(p, 1) for p in pred]})")
        if cfg["random_init"]:
            out = studies.piece(run_dir, f"random/{depth}", lambda: train(cfg, depth, "random"),
                          log)
            log(f"depth {depth}, random init: stage times {out['stage_times']}")


def report(run_dir: Path) -> list[str]:
    cfg = studies.load_json(Path(run_dir) / "config.json")
    res = studies.results(run_dir)
    sv, eps, lr = cfg["singular_values"], cfg["init_strength"], cfg["learning_rate"]
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    colors = ["tab:gray", "tab:blue", "tab:green", "tab:red", "tab:purple", "tab:orange"]
    rows = []
    for i, depth in enumerate(cfg["depths"]):
        r = res.get(f"depth/{depth}")
        if r is None:
            continue
        c = colors[i % len(colors)]
        ax.plot(r["steps"], r["loss"], color=c, lw=1.4, label=f"depth {depth}")
        rr = res.get(f"random/{depth}")
        if rr is not None:
            ax.plot(rr["steps"], rr["loss"], color=c, lw=0.8, ls="--", alpha=0.7)
        for s, t in zip(sv, r["stage_times"]):
            p = predicted_stage_time(s, eps, depth, lr)
            if p <= r["steps"][-1]:
                ax.axvline(p, color=c, ls=":", lw=0.9)
            if t is not None:
                ax2.scatter(p, t, color=c, s=25)
            rows.append((depth, s, p, t))
        ax2.scatter([], [], color=c, label=f"depth {depth}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Deep linear nets, ε₀ = {eps:g}, s = {', '.join(f'{x:g}' for x in sv)}")
    ax.legend(fontsize=8, title="dotted: predicted stage times\ndashed: random init",
              title_fontsize=7)
    lim = [min(p for _, _, p, _ in rows) * 0.8, max(p for _, _, p, _ in rows) * 1.25]
    ax2.plot(lim, lim, "k--", lw=0.8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("predicted stage time (steps)")
    ax2.set_ylabel("measured stage time (u_α = s_α/2)")
    ax2.legend(fontsize=8)
    fig.savefig(Path(run_dir) / "plateaus.png", dpi=90)

    lines = ["## Plateaus in deep linear networks", "",
             f"Whitened inputs in {cfg['dim']} dimensions, teacher singular values "
             f"{sv}, decoupled initialization of strength ε₀ = {eps:g}, full-batch GD with "
             f"η = {lr:g} (τ = {1 / lr:g} steps). Stage time: the first step at which a "
             "mode's strength reaches half its singular value.", "",
             "| depth | s | predicted | measured | measured / predicted | random init |",
             "|---|---|---|---|---|---|"]
    for depth, s, p, t in rows:
        rr = res.get(f"random/{depth}")
        tr = rr["stage_times"][sv.index(s)] if rr is not None else None
        lines.append(f"| {depth} | {s:g} | {p:.1f} | " + (
            f"{t:.1f} | {t / p:.3f} |" if t is not None else "not reached | — |") +
            (f" {tr:.1f} |" if tr is not None else " — |"))
    lines += ["", "![plateaus](plateaus.png)", ""]
    return lines
