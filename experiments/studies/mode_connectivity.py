"""Mode connectivity (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast
Ensembling of DNNs"; Draxler et al. 2018; the straight path as in Frankle et al. 2020).

Claim: two networks trained from different initializations are separated by a high
loss barrier along the straight line between them, yet joined by a simple curve, a
quadratic Bezier curve with one trained control point, along which the training loss
stays low and the test error at the curve's worst point is within about a point of the
endpoints' (Garipov et al. report 0.2–1 point on CIFAR-10).

The study trains the same MLP on MNIST-1D from two seeds (same data order and
optimizer), then measures the straight path (`ls.linear_barrier`) and trains the
curve(s) of `[curve] kinds` (`ls.connect`, t drawn uniformly at each step) on the
training set. Along each path it evaluates the training loss and the test loss and
error at `num_points` values of t; the barrier is the largest rise of the training loss
above the line between the endpoint losses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import numpy as np
import optax

import landscape as ls
from experiments import studies
from experiments.report import Figure
from experiments.schema import check, option
from experiments.train import build_model

NAME = "mode_connectivity"
SWEEP = False
ENDS = ("a", "b")


@dataclass(frozen=True)
class Model:
    """The MLP both endpoints share."""

    hidden: tuple[int, ...] = option((100, 100), doc="hidden widths")
    activation: Literal["relu", "tanh", "gelu"] = "relu"

    def check(self, where):
        studies.nonempty(self, where, "hidden")
        check(all(h >= 1 for h in self.hidden), f"{where}.hidden must be positive widths")


@dataclass(frozen=True)
class Train(studies.Train):
    """Mini-batch training of each endpoint (`experiments.loop.fit`); `seed` and
    `seed_b` initialize the two (the data order is `seed + 1` for both)."""

    steps: int = option(3000, ge=1, le=10**9)
    seed_b: int = option(1, ge=0, le=2**32 - 1, doc="the second endpoint's initialization")

    def check(self, where):
        super().check(where)
        check(self.seed_b != self.seed, f"{where}.seed_b must differ from {where}.seed")


@dataclass(frozen=True)
class Curve:
    """The trained curves between the endpoints (`ls.connect`)."""

    kinds: tuple[Literal["bezier", "polychain"], ...] = option(
        ("bezier", "polychain"), doc="curves to train")
    steps: int = option(3000, ge=1, le=10**9)
    learning_rate: float = option(1e-2, gt=0, doc="Adam on the control point")
    batch_size: int = option(128, ge=1)
    t_samples: int = option(1, ge=1, doc="t drawn per step")
    num_points: int = option(21, ge=3, doc="evaluation points on every path")
    seed: int = option(0, ge=0, le=2**32 - 1)

    def check(self, where):
        studies.nonempty(self, where, "kinds")


@dataclass(frozen=True)
class Config(studies.Study):
    """Two MLPs from different seeds on MNIST-1D: the straight path and trained curves."""

    name: str = studies.own(NAME, "name")
    study: str = studies.own(NAME, "study")
    data: studies.MNIST1D = None
    model: Model = None
    train: Train = None
    curve: Curve = None

    def check(self, where):
        super().check(where)
        studies.check_batch(self.data, self.train)
        check(self.curve.batch_size <= self.data.num_train,
              f"curve.batch_size ({self.curve.batch_size}) must not exceed data.num_train "
              f"({self.data.num_train})")


# ---------------------------------------------------------------- pieces ---

def setup(cfg: dict):
    """`(apply_fn, loss_fn, error_fn, init_params_a, init_params_b, train, test)`."""
    train, test = studies.mnist1d(cfg["data"]["num_train"], cfg["data"]["num_test"])
    m = cfg["model"]
    model = build_model({"name": "mlp", "hidden": list(m["hidden"]),
                         "activation": m["activation"]}, train[0].shape[1], 10)

    def loss_fn(p, batch):
        return ls.cross_entropy(model.apply_fn(p, batch[0]), batch[1])

    def error_fn(p, batch):
        return 1.0 - ls.accuracy(model.apply_fn(p, batch[0]), batch[1])

    inits = [model.init(jax.random.key(cfg["train"][k])) for k in ("seed", "seed_b")]
    return model.apply_fn, loss_fn, error_fn, *inits, train, test


def path_values(loss_fn, error_fn, along, train, test) -> dict:
    """Training loss, test loss and test error at each t of a path; `along(fn, data)`
    evaluates `fn(params, data)` at each t."""
    return {"train_loss": np.asarray(along(loss_fn, train)).tolist(),
            "test_loss": np.asarray(along(loss_fn, test)).tolist(),
            "test_error": np.asarray(along(error_fn, test)).tolist()}


def linear(cfg: dict, loss_fn, error_fn, a, b, train, test) -> dict:
    n = cfg["curve"]["num_points"]
    path = ls.linear_barrier(loss_fn, a, b, train, num_points=n)

    def along(fn, data):
        return ls.linear_barrier(fn, a, b, data, num_points=n).loss

    return {"t": np.asarray(path.t).tolist(), "barrier": float(path.barrier),
            "barrier_mean": float(path.barrier_mean),
            **path_values(loss_fn, error_fn, along, train, test)}


def curve(cfg: dict, kind: str, loss_fn, error_fn, a, b, train, test) -> dict:
    c = cfg["curve"]
    conn = ls.connect(loss_fn, a, b, train, key=jax.random.key(c["seed"]), kind=kind,
                      steps=c["steps"], optimizer=optax.adam(c["learning_rate"]),
                      batch_size=c["batch_size"], t_samples=c["t_samples"],
                      num_points=c["num_points"])
    losses = np.asarray(conn.train_loss)
    window = max(1, len(losses) // 50)
    return {"t": np.asarray(conn.t).tolist(), "barrier": float(conn.barrier),
            "barrier_mean": float(conn.barrier_mean),
            "training": [float(losses[i:i + window].mean())
                         for i in range(0, len(losses), window)],
            **path_values(loss_fn, error_fn, lambda fn, d: conn.along(fn, d), train, test)}


def run(cfg: dict, run_dir: Path, log) -> None:
    _, loss_fn, error_fn, init_a, init_b, train, test = setup(cfg)
    ends = {}
    for end, init in zip(ENDS, (init_a, init_b)):
        ends[end] = studies.array_piece(
            run_dir, f"params-{end}",
            lambda init=init: studies.train_configured(cfg, loss_fn, init, train).params,
            init, log)
    a, b = ends["a"], ends["b"]
    lin = studies.piece(run_dir, "linear",
                        lambda: linear(cfg, loss_fn, error_fn, a, b, train, test), log)
    log(f"linear: barrier {lin['barrier']:.3g}, worst test error "
        f"{max(lin['test_error']):.3f}")
    for kind in cfg["curve"]["kinds"]:
        c = studies.piece(run_dir, f"curve/{kind}", lambda kind=kind: curve(
            cfg, kind, loss_fn, error_fn, a, b, train, test), log)
        log(f"{kind}: barrier {c['barrier']:.3g}, worst test error "
            f"{max(c['test_error']):.3f}")


# ----------------------------------------------------------------- report ---

def summary(done: dict) -> dict:
    """Per path (`linear`, then each curve kind): barrier, the endpoints' mean test
    error, the worst test error along the path and where (t)."""
    out = {}
    for key in ["linear"] + sorted(k for k in done if k.startswith("curve/")):
        if key not in done:
            continue
        p = done[key]
        err = np.asarray(p["test_error"])
        worst = int(np.argmax(err))
        out[key.split("/")[-1]] = {
            "barrier": p["barrier"], "barrier_mean": p["barrier_mean"],
            "max_train_loss": float(np.max(p["train_loss"])),
            "end_train_loss": 0.5 * (p["train_loss"][0] + p["train_loss"][-1]),
            "end_error": 0.5 * float(err[0] + err[-1]), "worst_error": float(err[worst]),
            "worst_t": float(p["t"][worst]),
        }
    return out


def figure(done: dict, path: Path, dpi: int = 90) -> None:
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    names = ["linear"] + sorted(k for k in done if k.startswith("curve/"))
    for key, color in zip(names, ["tab:red", "tab:blue", "tab:green"]):
        if key not in done:
            continue
        p, label = done[key], ("straight line" if key == "linear"
                               else f"{key.split('/')[1]} curve")
        left.plot(p["t"], p["train_loss"], color=color, label=f"{label}, train")
        left.plot(p["t"], p["test_loss"], color=color, ls="--", label=f"{label}, test")
        right.plot(p["t"], 100 * np.asarray(p["test_error"]), color=color, label=label)
    left.set_xlabel("t")
    left.set_ylabel("cross-entropy")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.set_title("loss along the path", fontsize=10)
    right.set_xlabel("t")
    right.set_ylabel("test error (%)")
    right.legend(fontsize=8)
    right.set_title("test error along the path", fontsize=10)
    fig.savefig(path, dpi=dpi)


def report(run_dir: Path) -> list[str]:
    run_dir = Path(run_dir)
    cfg = studies.load_json(run_dir / "config.json")
    done = studies.results(run_dir)
    rows = summary(done)
    if not rows:
        return ["No path measured yet."]
    figure(done, run_dir / "mode_connectivity.png")
    m, tr = cfg["model"], cfg["train"]
    lines = ["## Mode connectivity (Garipov et al. 2018)", "",
             f"MLP 40→{'→'.join(map(str, m['hidden']))}→10 ({m['activation']}), "
             f"{tr['steps']} steps of {tr['optimizer']} (η = {tr['learning_rate']:g}) "
             f"from seeds {tr['seed']} and {tr['seed_b']}; curves trained "
             f"{cfg['curve']['steps']} steps on {cfg['data']['num_train']} training "
             "examples.", "",
             "| path | barrier (train loss) | max train loss | endpoints' train loss | "
             "endpoints' test error | worst test error (t) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['barrier']:.3g} | {r['max_train_loss']:.3g} | "
                     f"{r['end_train_loss']:.3g} | {100 * r['end_error']:.1f}% | "
                     f"{100 * r['worst_error']:.1f}% ({r['worst_t']:.2f}) |")
    lines += ["", "![loss and test error along the paths](mode_connectivity.png)", ""]
    return lines
