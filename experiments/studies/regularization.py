"""Regularization and early stopping: L2 in the loss versus decoupled weight decay
(Loshchilov & Hutter 2019, "Decoupled weight decay regularization"), and the best
test step as early stopping's record.

Claims: for SGD an L2 penalty ½λ‖θ‖² in the loss and weight decay are the same thing,
but for Adam they are not: the penalty's gradient is rescaled by Adam's per-parameter
normalization, so weights with large gradients are barely regularized, while AdamW's
decoupled decay shrinks every weight at the same rate. Decoupled decay is reported
to regularize Adam better. Without regularization a small training set is overfit:
test accuracy peaks and then falls, which early stopping (keep the best test step)
exploits; regularization keeps the late model closer to the peak.

The config trains AdamW on a small MNIST-1D training set and sweeps `train.l2` (the
penalty in the loss, which Adam's statistics see) against `optimizer.weight_decay`
(decoupled); both are vmapped, so the whole grid is one compiled program. The report
compares the pure-L2 row with the pure-decoupled column: final and best test
accuracy, the best test step, final training loss and λ_max.
"""

from __future__ import annotations

import functools

import math
from pathlib import Path

import numpy as np
from experiments.report import matplotlib
from experiments.report import Figure

from experiments.studies import _summary
from experiments.studies._summary import cell as fmt, grouped, mean_curve
from experiments.sweep import Results

mean_std = functools.partial(_summary.mean_std, ddof=0)  # population std, as tabled

NAME = "regularization"
SWEEP = True

L2 = "train.l2"
WD = "optimizer.weight_decay"


def pure_settings(records: list[dict], test_loss: dict | None = None) -> list[dict]:
    """The unregularized cell, the L2-only row and the decoupled-only column of the
    grid, each with its seed-mean measures (mean, std); with the `test_loss` curves,
    also the seed-mean curve's lowest value and its step (`min_test_loss`)."""
    out = []
    for (l2, wd), recs in grouped(records, L2, WD).items():
        if l2 > 0 and wd > 0:
            continue
        kind = "none" if l2 == 0 and wd == 0 else ("L2 in the loss" if l2 > 0 else
                                                   "decoupled (AdamW)")
        row = {"kind": kind, "strength": l2 if l2 > 0 else wd, L2: l2, WD: wd,
               "members": [r["member"] for r in recs]}
        for key in ("train_loss", "test_accuracy", "best_test_accuracy", "best_test_step",
                    "lambda_max"):
            row[key] = mean_std(r.get(key, math.nan) for r in recs)
        steps, loss = mean_curve(test_loss or {}, row["members"])
        row["min_test_loss"] = ((float(loss.min()), int(steps[np.argmin(loss)]))
                                if loss.size else (math.nan, None))
        row["final_test_loss"] = float(loss[-1]) if loss.size else math.nan
        out.append(row)
    order = {"none": 0, "L2 in the loss": 1, "decoupled (AdamW)": 2}
    return sorted(out, key=lambda r: (order[r["kind"]], r["strength"]))


def _grid(records, key):
    l2s = sorted({r[L2] for r in records})
    wds = sorted({r[WD] for r in records})
    grid = np.full((len(l2s), len(wds)), np.nan)
    for (l2, wd), recs in grouped(records, L2, WD).items():
        grid[l2s.index(l2), wds.index(wd)] = mean_std(r[key] for r in recs)[0]
    return l2s, wds, grid


def _figure(results: Results, rows: list[dict], path: Path) -> None:
    records = results.records()
    curves = results.curves("test_accuracy")
    fig = Figure(figsize=(16, 4))
    ax_l2, ax_wd, ax_grid = fig.subplots(1, 3, gridspec_kw={"wspace": 0.3})
    cmap = matplotlib.colormaps["viridis"]
    for ax, kind in ((ax_l2, "L2 in the loss"), (ax_wd, "decoupled (AdamW)")):
        mine = [r for r in rows if r["kind"] in ("none", kind)]
        for k, r in enumerate(mine):
            steps, acc = mean_curve(curves, r["members"])
            color = "k" if r["kind"] == "none" else cmap(0.9 * k / max(len(mine) - 1, 1))
            ax.plot(steps, acc, color=color, lw=1.5,
                    label="none" if r["kind"] == "none" else f"{r['strength']:g}")
            best = int(np.argmax(acc)) if acc.size else None
            if best is not None:
                ax.plot(steps[best], acc[best], "*", color=color, ms=9)
        ax.set(xlabel="step", ylabel="test accuracy (mean over seeds)",
               title=f"{kind}: test accuracy (★ best step)")
        ax.legend(fontsize=8, title="λ" if kind.startswith("L2") else "weight decay",
                  title_fontsize=8)
    l2s, wds, grid = _grid(records, "test_accuracy")
    im = ax_grid.imshow(grid, origin="lower", aspect="auto", cmap="magma")
    for (i, j), v in np.ndenumerate(grid):
        ax_grid.text(j, i, "—" if np.isnan(v) else f"{v:.3f}", ha="center", va="center",
                     color="w" if np.isnan(v) or v < np.nanmean(grid) else "k", fontsize=8)
    ax_grid.set_xticks(range(len(wds)), [f"{w:g}" for w in wds])
    ax_grid.set_yticks(range(len(l2s)), [f"{v:g}" for v in l2s])
    ax_grid.set(xlabel="decoupled weight decay", ylabel="L2 coefficient λ in the loss",
                title="final test accuracy")
    fig.colorbar(im, ax=ax_grid)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    """The L2-versus-decoupled table, the early-stopping record and
    `regularization.png`."""
    path = Path(run_dir)
    results = Results(path)
    rows = pure_settings(results.records(), results.curves("test_loss"))
    _figure(results, rows, path / "regularization.png")
    steps = results.config["train"]["steps"]
    cell = lambda r, key, d=3: ("—" if math.isnan(r[key][0]) else
                                f"{fmt(r[key][0], d)} ± {fmt(r[key][1], 1)}")
    lines = ["## Regularization and early stopping", "",
             f"{steps} steps of AdamW; mean ± std over seeds. 'Best test' is early "
             "stopping's record: the highest test accuracy over the record windows and "
             "the step it was reached.", "",
             "| regularizer | strength | final train loss | final test accuracy | "
             "best test accuracy | best step | final − best | final test loss | "
             "lowest test loss (step) | λ_max |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = r["test_accuracy"][0] - r["best_test_accuracy"][0]
        lines.append(f"| {r['kind']} | {r['strength']:g} | {cell(r, 'train_loss')} | "
                     f"{cell(r, 'test_accuracy')} | {cell(r, 'best_test_accuracy')} | "
                     f"{fmt(r['best_test_step'][0], 4)} | {fmt(drop, 2)} | "
                     f"{fmt(r['final_test_loss'])} | {fmt(r['min_test_loss'][0])} "
                     f"({r['min_test_loss'][1]}) | {cell(r, 'lambda_max')} |")
    best = {kind: max((r for r in rows if r["kind"] == kind),
                      key=lambda r: r["test_accuracy"][0], default=None)
            for kind in ("L2 in the loss", "decoupled (AdamW)")}
    lines += [""] + [f"Best final test accuracy with {kind}: "
                     f"{fmt(r['test_accuracy'][0])} at strength {r['strength']:g}."
                     for kind, r in best.items() if r is not None]
    lines += ["", "![regularization](regularization.png)", ""]
    return lines
