"""When the proxy becomes the target (Zhang et al. 2017, "Understanding deep learning
requires rethinking generalization").

Claim: a network big enough for its data drives the training loss to zero even when a
fraction of the labels (or all of them) are replaced by random ones: it memorizes.
Test accuracy then rises while the clean signal is learned and falls as the noisy
labels are fitted, and the minima that fit more noise are sharper.

The config sweeps `data.label_noise` (the fraction of training labels redrawn
uniformly; the test labels stay clean) with seeds, and trains every member for the
same fixed budget, with no early stop, so the late fall of test accuracy is seen.
Sharpness is read from λ_max recorded along training (the `[record]` table) at the
first record where the member's training loss fell below `LEVEL`, so the noise levels
are compared at equal training loss: at the end of the budget the losses differ by
orders of magnitude and a cross-entropy Hessian shrinks with the loss. The report
draws the training loss and test accuracy curves and λ_max against training loss per
noise level, and tabulates the final training loss, the best and final test accuracy
(early stopping's record) and λ_max at the level.
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

NAME = "memorization"
SWEEP = True

NOISE = "data.label_noise"
LEVEL = 0.1  # the training loss at which sharpness is compared


def sharpness_at_loss(train_loss: list[tuple[int, float]],
                      lambda_max: list[tuple[int, float]], level: float = LEVEL) -> float:
    """λ_max at the first record step where the training loss (the mean over the record
    window ending there) was below `level`; NaN if it never was."""
    loss = dict(train_loss)
    for step, value in lambda_max:
        if step in loss and loss[step] < level:
            return value
    return math.nan


def summary(results: Results) -> list[dict]:
    """Per noise level (seed means): final training loss, final and best test accuracy,
    the step of the best, λ_max (and worst-case sharpness when measured)."""
    records = results.records()
    curves = results.curves("test_accuracy")
    train, lam = results.curves("train_loss"), results.curves("lambda_max")
    for r in records:
        r["lambda_max_at_level"] = sharpness_at_loss(train.get(r["member"], []),
                                                     lam.get(r["member"], []))
    out = []
    for (noise,), recs in grouped(records, NOISE).items():
        steps, acc = mean_curve(curves, [r["member"] for r in recs])
        row = {"label_noise": noise, "members": len(recs),
               "diverged": sum(r["status"] == "diverged" for r in recs)}
        for key in ("train_loss", "train_accuracy", "test_accuracy", "best_test_accuracy",
                    "best_test_step", "lambda_max", "lambda_max_at_level", "worst_case"):
            row[key] = mean_std(r.get(key, math.nan) for r in recs)
        # The fall after the peak, on the seed-mean curve.
        row["peak_minus_final"] = (float(np.max(acc) - acc[-1]) if acc.size else math.nan)
        out.append(row)
    return out


def _figure(results: Results, rows: list[dict], path: Path) -> None:
    records = results.records()
    train = results.curves("train_loss")
    test = results.curves("test_accuracy")
    fig = Figure(figsize=(15, 4))
    ax_loss, ax_acc, ax_sharp = fig.subplots(1, 3, gridspec_kw={"wspace": 0.3})
    cmap = matplotlib.colormaps["plasma"]
    by_noise = grouped(records, NOISE)
    for k, ((noise,), recs) in enumerate(by_noise.items()):
        color = cmap(0.85 * k / max(len(by_noise) - 1, 1))
        members = [r["member"] for r in recs]
        for ax, curves in ((ax_loss, train), (ax_acc, test)):
            for m in members:
                if curves.get(m):
                    s, v = zip(*curves[m])
                    ax.plot(s, v, color=color, lw=0.5, alpha=0.3)
            steps, mean = mean_curve(curves, members)
            ax.plot(steps, mean, color=color, lw=2, label=f"{noise:.0%} random labels")
    ax_loss.set(yscale="log", xlabel="step", ylabel="training loss on the (noisy) labels",
                title="training loss (window mean)")
    ax_acc.axhline(0.1, color="k", ls=":", lw=1, label="chance")
    ax_acc.set(xlabel="step", ylabel="test accuracy (clean labels)",
               title="test accuracy along training")
    lam = results.curves("lambda_max")
    for k, ((noise,), recs) in enumerate(by_noise.items()):
        color = cmap(0.85 * k / max(len(by_noise) - 1, 1))
        for j, r in enumerate(recs):
            loss = dict(train.get(r["member"], []))
            pts = [(loss[s], v) for s, v in lam.get(r["member"], []) if s in loss]
            if pts:
                ax_sharp.plot(*zip(*pts), color=color, lw=1.2, marker=".", ms=3,
                              label=f"{noise:.0%} random labels" if j == 0 else None)
    ax_sharp.axvline(LEVEL, color="k", ls=":", lw=1, label=f"compared at loss {LEVEL:g}")
    ax_sharp.set(xscale="log", xlabel="training loss (window mean)", ylabel="λ_max",
                 title="λ_max along training against training loss")
    ax_sharp.invert_xaxis()
    for ax in (ax_loss, ax_acc, ax_sharp):
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    """The per-noise table and `memorization.png`."""
    path = Path(run_dir)
    results = Results(path)
    rows = summary(results)
    _figure(results, rows, path / "memorization.png")
    steps = results.config["train"]["steps"]
    has_wc = not all(math.isnan(r["worst_case"][0]) for r in rows)
    lines = ["## When the proxy becomes the target", "",
             f"Every member trained for {steps} steps without early stopping; mean ± std "
             "over seeds. Training loss and accuracy are on the noisy labels the network "
             "was given, test accuracy on clean labels; 'fall' is the seed-mean test "
             "accuracy curve's peak minus its last value.", "",
             "| random labels | train loss | train accuracy | best test accuracy | at step | "
             f"final test accuracy | fall | λ_max at loss {LEVEL:g} | final λ_max |" +
             (" worst-case |" if has_wc else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if has_wc else "")]
    for r in rows:
        cell = lambda key, d=3: (fmt(r[key][0], d) + " ± " + fmt(r[key][1], 1)
                                 if not math.isnan(r[key][0]) else "—")
        lines.append(f"| {r['label_noise']:.0%} | {cell('train_loss')} | "
                     f"{cell('train_accuracy')} | {cell('best_test_accuracy')} | "
                     f"{fmt(r['best_test_step'][0], 4)} | {cell('test_accuracy')} | "
                     f"{fmt(r['peak_minus_final'], 2)} | {cell('lambda_max_at_level')} | "
                     f"{cell('lambda_max')} |" +
                     (f" {cell('worst_case')} |" if has_wc else ""))
    diverged = sum(r["diverged"] for r in rows)
    if diverged:
        lines += ["", f"{diverged} member(s) diverged and are left out of the means."]
    lines += ["", "![memorization](memorization.png)", ""]
    return lines
