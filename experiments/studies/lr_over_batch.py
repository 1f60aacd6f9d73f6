"""Learning rate over batch size (Jastrzębski et al. 2017, "Three Factors Influencing
Minima in SGD", arXiv 1711.04623).

Claim: the ratio of learning rate to batch size, η/B, sets the noise of SGD, and a
larger η/B leads to flatter minima: the top Hessian eigenvalue at the end of training
falls as η/B grows, across the batch × learning-rate grid.

The report plots λ_max against η/B on log-log axes and gives Spearman's rank
correlation (`scipy.stats.spearmanr`) over the members that reached the training-loss
target, and over all members that did not diverge.
"""

from __future__ import annotations

import math
from pathlib import Path

from experiments.report import matplotlib
import numpy as np
from experiments.report import Figure
from scipy import stats

from experiments.studies import _summary as S

NAME = "lr_over_batch"
SWEEP = True


def ratio(record: dict) -> float:
    return record["learning_rate"] / record["batch_size"]


def spearman(records: list[dict], key: str = "lambda_max") -> tuple[float, float, int]:
    """Spearman's ρ between η/B and `key` over the finite members: (ρ, p-value, count)."""
    x = np.array([ratio(r) for r in records], float)
    y = np.array([r[key] for r in records], float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan, math.nan, int(ok.sum())
    res = stats.spearmanr(x[ok], y[ok])
    return float(res.statistic), float(res.pvalue), int(ok.sum())


def _converged(records: list[dict], target: float) -> list[dict]:
    return [r for r in records if r["status"] == "converged" or target <= 0]


def _figure(records: list[dict], target: float, path: Path) -> None:
    fig = Figure(figsize=(5.8, 4.2))
    ax = fig.subplots()
    batches = sorted({r["batch_size"] for r in records})
    lrs = sorted({r["learning_rate"] for r in records})
    norm = matplotlib.colors.LogNorm(vmin=min(batches), vmax=max(max(batches), 2))
    cmap = matplotlib.colormaps["viridis"]
    markers = "osD^v<>ph"
    for r in S.finished(records):
        done = r["status"] == "converged" or target <= 0
        colour = cmap(norm(r["batch_size"]))
        ax.scatter(ratio(r), r["lambda_max"], marker=markers[lrs.index(r["learning_rate"])
                                                            % len(markers)],
                   s=40, facecolor=colour if done else "none", edgecolor=colour if not done
                   else "k", linewidth=0.8 if not done else 0.4, zorder=3)
    ok = _converged(S.finished(records), target)
    if len(ok) >= 2:
        x = np.log([ratio(r) for r in ok])
        y = np.log([r["lambda_max"] for r in ok])
        slope, icpt = np.polyfit(x, y, 1)
        grid = np.linspace(x.min(), x.max(), 20)
        ax.plot(np.exp(grid), np.exp(icpt + slope * grid), "k--", lw=1,
                label=f"log-log fit, slope {slope:.2f}")
    for lr in lrs:
        ax.scatter([], [], marker=markers[lrs.index(lr) % len(markers)], color="grey",
                   label=f"η = {lr:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate / batch size (η/B)")
    ax.set_ylabel("λ_max of the Hessian at the end")
    rho, p, n = spearman(ok)
    ax.set_title(f"Spearman ρ = {rho:+.2f} over {n} members (hollow: missed the target)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                       label="batch size")
    bar.set_ticks(batches, labels=[str(b) for b in batches])
    bar.minorticks_off()
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    path = Path(run_dir)
    cfg, records = S.load(path)
    alive = S.finished(records)
    if not alive:
        return ["## λ_max against η/B", "", "Every member diverged: nothing to compare."]
    target = cfg["train"]["until_train_loss"]
    _figure(records, target, path / "lr_over_batch.png")
    rows = []
    for (b, lr), members in S.by(alive, lambda r: (r["batch_size"], r["learning_rate"])).items():
        rows.append([str(b), f"{lr:g}", f"{lr / b:.3g}",
                     f"{sum(r['status'] == 'converged' for r in members)}/{len(members)}",
                     S.fmt(*S.mean_std(r["steps"] for r in members), digits=4),
                     S.fmt(*S.mean_std(r["test_accuracy"] for r in members)),
                     S.fmt(*S.mean_std(r["lambda_max"] for r in members))])
    rho_ok, p_ok, n_ok = spearman(_converged(alive, target))
    rho_all, p_all, n_all = spearman(alive)
    lines = ["## λ_max against η/B (Jastrzębski et al. 2017)", "",
             f"Spearman's rank correlation between η/B and λ_max: {rho_ok:+.2f} "
             f"(p = {p_ok:.2g}) over the {n_ok} members that reached the training loss "
             f"{target:g}; {rho_all:+.2f} (p = {p_all:.2g}) over all {n_all} that did not "
             "diverge.", "",
             "![lambda_max against eta/B](lr_over_batch.png)", ""]
    lines += S.table(["batch size", "η", "η/B", "reached target", "steps", "test accuracy",
                      "λ_max"], rows)
    return lines + [""]
