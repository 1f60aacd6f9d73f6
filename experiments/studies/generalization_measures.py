"""Generalization measures ranked (Jiang et al. 2019, "Fantastic Generalization Measures
and Where to Find Them").

Claim: over many networks trained to the same training-loss criterion on a grid of
hyper-parameters, a measure that predicts generalization ranks the models as their
generalization gap does. Jiang et al. score each measure by Kendall's τ with the gap
over all models and by the granulated τ: for each hyper-parameter axis, τ among models
that differ only in that axis, averaged (ψ per axis, Ψ their mean). On CIFAR-10 and
SVHN the PAC-Bayes flatness measures (plain and magnitude-aware) led, norm- and
margin-based measures did worse, and some, such as the parameter norms, correlated
negatively.

The config is a sweep over five axes (learning rate, batch size, L2, momentum, and the
MLP's depth and width as `model.hidden`) and two seeds, every member stopped at the same
training loss (`until_train_loss`), and every final measure of `experiments.measures`
taken at the point reached. The report keeps the members that reached the criterion
and tabulates, per measure, τ with the accuracy gap (train minus test accuracy), Ψ and
ψ per axis, best first, with a bar figure.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from experiments import grid as gridlib
from experiments import measures as measurelib
from experiments.report import GAP, Figure, granulated_kendall, kendall_tau
from experiments.sweep import Results

NAME = "generalization_measures"
SWEEP = True


def scores(run_dir: str | Path) -> dict:
    """`{"members", "converged", "axes", "rows"}`: rows per measure (τ, Ψ, ψ per
    axis) over the members that reached the training-loss criterion, sorted by Ψ."""
    res = Results(Path(run_dir))
    records = res.records()
    kept = [r for r in records if r["status"] == "converged"]
    axes = [k for k in gridlib.sweep_keys(res.config) if k != "seed"
            and len({str(r[k]) for r in kept}) > 1]
    rows = []
    for m in measurelib.CURVATURE:
        if not kept or m not in kept[0]:
            continue
        recs = [{**r, **{k: str(r[k]) for k in axes}} for r in kept]
        psi, per = granulated_kendall(recs, m, axes)
        rows.append({"measure": m, "label": measurelib.LABELS[m],
                     "tau": kendall_tau([r[m] for r in kept], [r[GAP] for r in kept]),
                     "psi": psi, "per_axis": per})
    rows.sort(key=lambda r: -r["psi"] if not math.isnan(r["psi"]) else math.inf)
    return {"members": len(records), "converged": len(kept), "axes": axes, "rows": rows}


def figure(table: dict, path: str | Path, dpi: int = 90) -> None:
    rows = table["rows"]
    fig = Figure(figsize=(7, 0.35 * len(rows) + 1.5), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(rows))
    ax.barh(y - 0.2, [r["tau"] for r in rows], 0.4, label="Kendall τ (all)")
    ax.barh(y + 0.2, [r["psi"] for r in rows], 0.4, label="granulated Ψ")
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("rank correlation with the accuracy gap")
    ax.set_title(f"{table['converged']} MLPs on MNIST-1D at equal training loss", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=dpi)


def report(run_dir: str | Path) -> list[str]:
    run_dir = Path(run_dir)
    table = scores(run_dir)
    if not table["rows"]:
        return ["## Generalization measures", "", "No member reached the criterion."]
    figure(table, run_dir / "generalization_measures.png")

    def fmt(x):
        return "—" if x is None or math.isnan(x) else f"{x:+.2f}"

    axes = table["axes"]
    lines = ["## Generalization measures (Jiang et al. 2019)", "",
             f"{table['converged']} of {table['members']} members reached the training-"
             "loss criterion and are ranked; τ and ψ against the accuracy gap.", "",
             "![τ and Ψ per measure](generalization_measures.png)", "",
             "| measure | Kendall τ | granulated Ψ | " + " | ".join(
                 f"ψ({a})" for a in axes) + " |", "|---|---|---|" + "---|" * len(axes)]
    for r in table["rows"]:
        lines.append(f"| {r['label']} | {fmt(r['tau'])} | {fmt(r['psi'])} | " +
                     " | ".join(fmt(r["per_axis"][a]) for a in axes) + " |")
    return lines
