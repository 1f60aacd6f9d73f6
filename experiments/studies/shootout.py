"""Optimizer shoot-out: SGD, Adam, Lion, SAM, ASAM, Sophia-H, Shampoo, SOAP and K-FAC on
MNIST-1D, each over a learning-rate grid, in one table: final test accuracy, the top
Hessian eigenvalue of the minimum reached, and wall-clock per step.

Optimizers: Kingma & Ba 2015 (Adam); Chen et al. 2023 (Lion); Foret et al. 2021 (SAM);
Kwon et al. 2021 (ASAM); Liu et al. 2024 (Sophia); Gupta et al. 2018 (Shampoo); Vyas et
al. 2025 (SOAP); Martens & Grosse 2015 (K-FAC).

The configs (`configs/shootout_mlp.toml`, `configs/shootout_cnn.toml`) sweep
`optimizer.name` × one shared learning-rate grid: a config's `[optimizer]` table is
shared by every swept optimizer, so per-optimizer grids cannot be written in one config;
the report takes each optimizer's best point on the shared grid (by test accuracy, mean
over seeds) and lists the rest in the members table.

Timing has two sources, kept apart:
- *per step, alone*: `time_steps` compiles a `lax.scan` of 200 `transforms.train_step`
  calls (`experiments.loop.scanned`, mini-batches in exact epochs) for one member on the config's model and batch size per optimizer, then times
  them in round-robin rounds (median of 5, compilation excluded, no measurement). Run
  once by the report and cached in `step_times.json`.
- *runner*: the store's `groups` table (`seconds` − `compile_seconds`) over the steps
  the group ran: every member of the group (the whole vmapped learning-rate grid) and
  the group's measurement pass are included, and the first group run also pays for
  compiling the measurement program, which the later groups reuse.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from experiments.report import Figure

import transforms as tx
from experiments import studies
from experiments.data import mnist1d, teacher_student
from experiments.studies import _summary as S
from experiments.loop import scanned
from experiments.train import build_model, loss_function

NAME = "shootout"
SWEEP = True

OPT = "optimizer.name"


def best_points(records: list[dict]) -> dict[str, dict]:
    """Per optimizer, its best learning rate by mean test accuracy over seeds, with the
    means (and spreads) of that grid point; optimizers that diverged everywhere are
    absent."""
    out = {}
    for name, members in S.by(S.finished(records), OPT).items():
        points = S.by(members, "learning_rate")
        lr = max(points, key=lambda v: np.mean([r["test_accuracy"] for r in points[v]]))
        row = {"learning_rate": lr, "seeds": len(points[lr]),
               "diverged": sum(r[OPT] == name and r["status"] == "diverged" for r in records)}
        for key in ("test_accuracy", "train_loss", "lambda_max"):
            row[key] = S.mean_std(r[key] for r in points[lr])
        out[name] = row
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["test_accuracy"][0]))


def _data(cfg: dict):
    d = cfg["data"]
    if d["name"] == "teacher_student":
        data = teacher_student(d["num_train"], d["num_test"], seed=d["seed"])
    else:
        data = mnist1d()
    return (jnp.asarray(data.x_train[: d["num_train"]]),
            jnp.asarray(data.y_train[: d["num_train"]]), data.num_classes)


def compiled_steps(cfg: dict, name: str, learning_rate: float, *, steps: int = 200):
    """A compiled `lax.scan` of `steps` calls of `transforms.train_step` (through
    `experiments.loop.scanned`) for optimizer `name`: one member, the config's model,
    loss and batch size. Returns
    `(run, compile_seconds)`; `run()` executes it once and returns its seconds."""
    x, y, num_classes = _data(cfg)
    model = build_model(cfg["model"], x.shape[1], num_classes)
    loss_fn = loss_function(model.apply_fn, cfg["train"]["loss"])
    params = model.init(jax.random.key(0))
    extra = ({"layers": tx.find_dense_layers(model.apply_fn, params, x[:1])}
             if name == "kfac" else {})
    opt = tx.make(name, learning_rate=learning_rate, **extra)
    scan = scanned(loss_fn, opt, (x, y), steps=steps, batch_size=cfg["train"]["batch_size"],
                   apply_fn=model.apply_fn)
    state = opt.init(params)
    t0 = time.perf_counter()
    compiled = scan.lower(params, state, (x, y), jax.random.key(2)).compile()
    compile_s = time.perf_counter() - t0

    def run() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, state, (x, y), jax.random.key(3)))
        return time.perf_counter() - t0

    return run, compile_s


def time_steps(cfg: dict, points: dict[str, float], *, steps: int = 200,
               repeats: int = 5) -> dict[str, dict]:
    """Seconds per training step of each optimizer alone (`points`: name → learning
    rate), compilation excluded. All are compiled first, then timed in `repeats`
    round-robin rounds, so a change in the machine's load during timing touches every
    optimizer alike. Returns name → {"step": median over rounds of seconds per step,
    "min": the fastest round's, "compile": compile seconds}."""
    runs = {n: compiled_steps(cfg, n, lr, steps=steps) for n, lr in points.items()}
    for run, _ in runs.values():
        run()  # warm-up: first execution allocates buffers
    rounds = {n: [] for n in runs}
    for _ in range(repeats):
        for n, (run, _) in runs.items():
            rounds[n].append(run() / steps)
    return {n: {"step": float(np.median(rounds[n])), "min": float(np.min(rounds[n])),
                "compile": runs[n][1]} for n in runs}


def runner_times(run_dir: Path) -> dict[str, dict]:
    """Per optimizer, from the store's groups table: seconds (compilation excluded) per
    group step, members in the group, compile seconds. Group steps are the most steps any
    of its members took."""
    with sqlite3.connect(run_dir / "results.sqlite") as conn:
        groups = conn.execute("SELECT key, seconds, compile_seconds, num_members FROM groups"
                              ).fetchall()
        steps = dict(conn.execute("SELECT group_key, MAX(steps) FROM members GROUP BY "
                                  "group_key").fetchall())
    out = {}
    for key, seconds, compile_s, members in groups:
        name = json.loads(key).get(OPT)
        if name is not None and steps.get(key):
            out[name] = {"step": (seconds - compile_s) / steps[key], "members": members,
                         "compile": compile_s}
    return out


def _step_times(run_dir: Path, cfg: dict, best: dict) -> dict:
    path = run_dir / "step_times.json"
    cached = studies.load_json(path, {})
    if set(best) - set(cached):  # all timed together, in the same rounds
        cached = time_steps(cfg, {n: row["learning_rate"] for n, row in best.items()})
        studies.save_json(path, cached)
    return cached


def _figure(records: list[dict], best: dict, alone: dict, path: Path) -> None:
    names = list(best)
    fig = Figure(figsize=(12, 7.2))
    axs = fig.subplots(2, 2, gridspec_kw={"hspace": 0.45, "wspace": 0.25})
    ax = axs[0][0]
    for i, (name, members) in enumerate(S.by(records, OPT).items()):
        pts = S.by(members, "learning_rate")
        lrs = list(pts)
        acc = [np.mean([r["test_accuracy"] if r["status"] != "diverged" else np.nan
                        for r in pts[lr]]) for lr in lrs]
        ax.plot(lrs, acc, marker="o", ms=3, lw=1, color=f"C{i % 10}",
                ls="-" if i < 10 else "--", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (shared grid)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy over the grid (gaps: diverged)", fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    colours = {n: f"C{i % 10}" for i, n in enumerate(S.by(records, OPT))}
    panels = [(axs[0][1], [best[n]["test_accuracy"][0] for n in names],
               "test accuracy at the best learning rate", False),
              (axs[1][0], [best[n]["lambda_max"][0] for n in names],
               "λ_max at the best learning rate", True),
              (axs[1][1], [1e3 * alone[n]["step"] for n in names],
               "milliseconds per training step (one member, alone)", False)]
    for ax, vals, title, log in panels:
        ax.bar(range(len(names)), vals, color=[colours[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=35, fontsize=8)
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
    lo = min(best[n]["test_accuracy"][0] for n in names)
    axs[0][1].set_ylim(max(0.0, lo - 0.1), None)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    path = Path(run_dir)
    cfg, records = S.load(path)
    best = best_points(records)
    if not best:
        return ["## Optimizer shoot-out", "", "Every member diverged: nothing to compare."]
    alone = _step_times(path, cfg, best)
    runner = runner_times(path)
    base = alone.get("sgd", {}).get("step")
    rows = []
    for name, row in best.items():
        r = runner.get(name, {})
        rows.append([name, f"{row['learning_rate']:g}", S.fmt(*row["test_accuracy"]),
                     S.fmt(*row["train_loss"]), S.fmt(*row["lambda_max"]),
                     f"{1e3 * alone[name]['step']:.3g}",
                     f"{alone[name]['step'] / base:.2f}" if base else "—",
                     f"{1e3 * r['step']:.3g} ({r['members']})" if r else "—",
                     f"{r['compile']:.1f}" if r else "—",
                     str(row["diverged"])])
    swept = cfg["sweep"].get(OPT, [cfg["optimizer"]["name"]])
    missing = [n for n in swept if n not in best]
    model = cfg["model"]["name"]
    lines = ["## Optimizer shoot-out", "",
             f"MNIST-1D, {model.upper()}, {cfg['train']['steps']} steps of batch "
             f"{cfg['train']['batch_size']}, learning-rate schedule "
             f"{cfg['optimizer'].get('schedule', 'constant')}; each optimizer at its best "
             "learning rate of the shared grid (by test accuracy), other hyper-parameters "
             "at their defaults. *ms/step alone*: one member, compiled scan of 200 "
             "train_steps, median of 5 round-robin rounds, no measurement. *runner ms/step*: the store's group time without compilation "
             "over the group's steps, for the whole vmapped grid (members in brackets) and "
             "including the measurement pass (the first group run also compiles the "
             "measurement program, which later groups reuse).", ""]
    lines += S.table(["optimizer", "best η", "test accuracy", "train loss", "λ_max",
                      "ms/step alone", "× sgd", "runner ms/step (members)",
                      "compile s", "diverged on grid"], rows)
    if missing:
        lines += ["", "Not in the table (no finished group in the store, or diverged at every "
                  "learning rate): " + ", ".join(missing) + "."]
    lines += ["", "![optimizer shoot-out](shootout.png)", ""]
    _figure(records, best, alone, path / "shootout.png")
    return lines
