"""The large-batch gap (Keskar et al. 2017, "On Large-Batch Training for Deep Learning:
Generalization Gap and Sharp Minima", ICLR 2017; arXiv 2016).

Claim: trained to the same training loss, large-batch runs end in sharper minima
(larger ε-sharpness and top Hessian eigenvalue) and test worse than small-batch runs.

The config (`configs/large_batch.toml`) trains each batch size until the training loss
reaches a common target (`train.until_train_loss`), so the minima are compared at equal
fit rather than after equal epochs; the report says how many members got there.
"""

from __future__ import annotations

import math
from pathlib import Path

from experiments.report import Figure

from experiments.studies import _summary as S

NAME = "large_batch"
SWEEP = True

PANELS = (("lambda_max", "λ_max of the Hessian"), ("keskar", "Keskar ε-sharpness (%)"),
          ("test_accuracy", "test accuracy"))


def compare(records: list[dict]) -> dict:
    """Per batch size, the mean and spread over seeds of every quantity in the report
    (members that diverged are left out)."""
    out = {}
    for batch, members in S.by(S.finished(records), "batch_size").items():
        row = {"members": len(members),
               "converged": sum(r["status"] == "converged" for r in members)}
        for key in ("steps", "train_loss", "test_accuracy", "lambda_max", "keskar"):
            if key in members[0]:
                row[key] = S.mean_std(r[key] for r in members)
        out[batch] = row
    return out


def _figure(records: list[dict], path: Path) -> None:
    fig = Figure(figsize=(11, 3.4))
    axs = fig.subplots(1, len(PANELS), gridspec_kw={"wspace": 0.35})
    groups = S.by(S.finished(records), "batch_size")
    for ax, (key, label) in zip(axs, PANELS):
        S.seed_dots(ax, groups.values(), key)
        ax.set_xticks(range(len(groups)), [str(b) for b in groups])
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_xlabel("batch size")
        ax.set_title(label, fontsize=10)
    fig.suptitle("Large-batch gap: each dot a seed, bars the means", fontsize=10, y=1.02)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def report(run_dir) -> list[str]:
    path = Path(run_dir)
    cfg, records = S.load(path)
    stats = compare(records)
    if not stats:
        return ["## Large-batch gap", "", "Every member diverged: nothing to compare."]
    _figure(records, path / "large_batch.png")
    target = cfg["train"]["until_train_loss"]
    rows = []
    for batch, row in stats.items():
        rows.append([str(batch), f"{row['converged']}/{row['members']}",
                     S.fmt(*row["steps"], digits=4), S.fmt(*row["train_loss"]),
                     S.fmt(*row["test_accuracy"]), S.fmt(*row["lambda_max"]),
                     S.fmt(*row.get("keskar", (math.nan, math.nan)))])
    lines = ["## Large-batch gap (Keskar et al. 2017)", "",
             f"Each batch size trained until the training loss fell below {target:g} "
             f"(at most {cfg['train']['steps']} steps); mean ± std over seeds.", ""]
    lines += S.table(["batch size", "reached target", "steps", "train loss",
                      "test accuracy", "λ_max", "Keskar ε-sharpness (%)"], rows)
    small, large = min(stats), max(stats)
    if small != large:
        s, l = stats[small], stats[large]
        ratios = [f"{label} × {l[key][0] / s[key][0]:.2f}" for key, label in
                  (("lambda_max", "λ_max"), ("keskar", "ε-sharpness")) if key in s]
        lines += ["", f"Batch {large} against batch {small}: " + ", ".join(ratios) +
                  f", test accuracy "
                  f"{100 * (l['test_accuracy'][0] - s['test_accuracy'][0]):+.1f} points."]
    lines += ["", "![large-batch gap](large_batch.png)", ""]
    return lines
