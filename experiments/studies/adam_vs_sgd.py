"""Adam versus SGD (Wilson et al. 2017, "The marginal value of adaptive gradient methods
in machine learning").

Claim: adaptive methods drive the training loss down faster than SGD, yet the
solutions they reach often generalize worse; later work (e.g. Zhou et al. 2020) ties
this to Adam settling in sharper minima.

The config sweeps `optimizer.name` (plain SGD, SGD with heavy-ball momentum, Adam) over
one learning-rate grid wide enough for all three, with seeds, and stops each member
when its training loss reaches `train.until_train_loss`. Each optimizer is *tuned* to
the learning rate whose seeds all reach that target in the fewest steps, so the three
are compared at equal training loss: steps taken, test accuracy, λ_max and worst-case
sharpness of the point each reached. The best test accuracy anywhere on the grid is
shown beside it, so an optimizer is not judged only at its fastest learning rate.
"""

from __future__ import annotations

import functools

import math
from pathlib import Path

import numpy as np
from experiments.report import Figure

from experiments.studies import _summary
from experiments.studies._summary import cell as fmt, grouped, mean_curve, pm
from experiments.sweep import Results

mean_std = functools.partial(_summary.mean_std, ddof=0)  # population std, as tabled

NAME = "adam_vs_sgd"
SWEEP = True

OPT = "optimizer.name"
COLORS = {"sgd": "tab:blue", "momentum": "tab:green", "adam": "tab:red",
          "adamw": "tab:purple"}


def tuned(records: list[dict]) -> dict[str, dict]:
    """Per optimizer: the learning rate whose seeds all converged in the fewest mean
    steps (`fastest_lr`, None if no learning rate converged for every seed) and the
    learning rate of the best mean test accuracy (`best_test_lr`)."""
    out = {}
    for (name,), recs in grouped(records, OPT).items():
        per_lr = grouped(recs, "learning_rate")
        done = {lr: mean_std(r["steps"] for r in rs)[0] for (lr,), rs in per_lr.items()
                if all(r["status"] == "converged" for r in rs)}
        acc = {lr: mean_std(r["test_accuracy"] for r in rs)[0] for (lr,), rs in per_lr.items()}
        acc = {lr: a for lr, a in acc.items() if not math.isnan(a)}
        out[name] = {"fastest_lr": min(done, key=done.get) if done else None,
                     "best_test_lr": max(acc, key=acc.get) if acc else None,
                     "best_test_accuracy": max(acc.values()) if acc else math.nan}
    return out


def first_below(steps, values, level: float) -> int | float:
    """The first recorded step whose value is below `level` (NaN if none)."""
    hit = np.flatnonzero(np.asarray(values) < level)
    return int(np.asarray(steps)[hit[0]]) if hit.size else math.nan


def _levels(target: float) -> list[float]:
    # Above the target: the members' curves end at different steps once they reach it.
    return [t for t in (1.0, 0.3, 0.1, 0.05) if t > target]


def _figure(results: Results, records: list[dict], picks: dict, path: Path) -> None:
    cfg = results.config
    target = cfg["train"]["until_train_loss"]
    curves = results.curves("train_loss")
    fig = Figure(figsize=(15, 4))
    ax_loss, ax_acc, ax_sharp = fig.subplots(1, 3, gridspec_kw={"wspace": 0.3})
    for (name,), recs in grouped(records, OPT).items():
        color = COLORS.get(name, None)
        lr = picks[name]["fastest_lr"] or picks[name]["best_test_lr"]
        mine = [r for r in recs if r["learning_rate"] == lr]
        for r in mine:
            if curves.get(r["member"]):
                s, v = zip(*curves[r["member"]])
                ax_loss.plot(s, v, color=color, lw=0.6, alpha=0.35)
        steps, mean = mean_curve(curves, [r["member"] for r in mine])
        ax_loss.plot(steps, mean, color=color, lw=2, label=f"{name}, lr {lr:g}")
        per_lr = grouped(recs, "learning_rate")
        lrs = np.array([lr for (lr,) in per_lr])
        for ax, key in ((ax_acc, "test_accuracy"), (ax_sharp, "lambda_max")):
            stats = [mean_std(r[key] for r in rs) for rs in per_lr.values()]
            m, s = np.array(stats).T
            ax.errorbar(lrs, m, yerr=s, color=color, marker="o", ms=4, capsize=2,
                        label=name, mfc="white")
            conv = np.array([all(r["status"] == "converged" for r in rs)
                             for rs in per_lr.values()])
            ax.plot(lrs[conv], m[conv], "o", color=color, ms=6)
    if target > 0:
        ax_loss.axhline(target, color="k", ls=":", lw=1, label=f"target {target:g}")
    ax_loss.set(yscale="log", xlabel="step", ylabel="training loss (window mean)",
                title="training loss at each optimizer's tuned lr")
    ax_acc.set(xscale="log", xlabel="learning rate", ylabel="test accuracy",
               title="test accuracy (filled: all seeds reached the target)")
    ax_sharp.set(xscale="log", yscale="log", xlabel="learning rate",
                 ylabel="λ_max of the training loss Hessian",
                 title="sharpness of the point reached")
    for ax in (ax_loss, ax_acc, ax_sharp):
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    """The tuned comparison table, the full grid, and `adam_vs_sgd.png`."""
    path = Path(run_dir)
    results = Results(path)
    records = results.records()
    cfg = results.config
    target = cfg["train"]["until_train_loss"]
    picks = tuned(records)
    _figure(results, records, picks, path / "adam_vs_sgd.png")
    has_wc = "worst_case" in records[0]
    lines = ["## Adam versus SGD", "",
             f"Each optimizer at the learning rate whose seeds all reached training loss "
             f"{target:g} in the fewest steps (mean ± std over seeds); the last column is "
             "the best mean test accuracy anywhere on the grid (tuned on the test set: "
             "MNIST-1D has no separate validation split here).", "",
             "| optimizer | tuned lr | steps to target | test accuracy | λ_max |" +
             (" worst-case sharpness |" if has_wc else "") + " best test accuracy (lr) |",
             "|---|---|---|---|---|" + ("---|" if has_wc else "") + "---|"]
    by_opt = grouped(records, OPT)
    for (name,), recs in by_opt.items():
        p = picks[name]
        lr = p["fastest_lr"]
        mine = [r for r in recs if r["learning_rate"] == lr]
        cells = ([f"{lr:g}", pm([r["steps"] for r in mine], 0),
                  pm([r["test_accuracy"] for r in mine]), pm([r["lambda_max"] for r in mine])]
                 + ([pm([r["worst_case"] for r in mine])] if has_wc else [])
                 if lr is not None else ["none reached the target"] + ["—"] * (3 + has_wc))
        lines.append(f"| {name} | " + " | ".join(cells) +
                     f" | {fmt(p['best_test_accuracy'])} ({fmt(p['best_test_lr'])}) |")
    lines += ["", "Steps until the seed-mean training loss (window means) first fell below "
              "each level, at the tuned learning rates:", "",
              "| optimizer | " + " | ".join(f"loss < {t:g}" for t in _levels(target)) + " |",
              "|---|" + "---|" * len(_levels(target))]
    curves = results.curves("train_loss")
    for (name,), recs in by_opt.items():
        lr = picks[name]["fastest_lr"]
        steps, mean = mean_curve(curves, [r["member"] for r in recs
                                          if r["learning_rate"] == lr])
        lines.append(f"| {name} | " + " | ".join(
            fmt(first_below(steps, mean, t)) for t in _levels(target)) + " |")
    lines += ["", "Every learning rate (members that missed the target are measured where "
              "the step budget ended, not at equal training loss):", "",
              "| optimizer | lr | reached target | steps | final train loss | "
              "test accuracy | λ_max |", "|---|---|---|---|---|---|---|"]
    for (name,), recs in by_opt.items():
        for (lr,), rs in grouped(recs, "learning_rate").items():
            n = sum(r["status"] == "converged" for r in rs)
            div = sum(r["status"] == "diverged" for r in rs)
            lines.append(f"| {name} | {lr:g} | {n}/{len(rs)}" +
                         (f" ({div} diverged)" if div else "") +
                         f" | {pm([r['steps'] for r in rs], 0)} | "
                         f"{pm([r['train_loss'] for r in rs])} | "
                         f"{pm([r['test_accuracy'] for r in rs])} | "
                         f"{pm([r['lambda_max'] for r in rs])} |")
    lines += ["", "![Adam versus SGD](adam_vs_sgd.png)", ""]
    return lines
