"""Edge of stability (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically
Occurs at the Edge of Stability").

Claim: under full-batch gradient descent with step size η, the sharpness λ_max of the
training loss first rises (progressive sharpening) until it reaches 2/η, the largest
value at which GD is stable on a quadratic, and then hovers around 2/η while the loss
keeps falling over long times, non-monotonically.

The config trains one MLP with MSE on one-hot targets by full-batch GD
(`batch_size = num_train`) at several step sizes, recording λ_max every few steps
(`[record]`). The report plots λ_max against steps with the 2/η lines and tabulates,
per step size, λ_max at the start, its peak, the first step it reached 0.9·2/η and its
median over the second half of training against 2/η.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from experiments.report import Figure
from experiments.sweep import Results

NAME = "edge_of_stability"
SWEEP = True


def summary(run_dir: str | Path) -> list[dict]:
    """Per member: learning rate, 2/η, λ_max at step 0, its lowest value in the first
    half of training (`lambda_dip` at `dip_step`), its peak after that, the first step
    after the dip at which it reached 0.9·2/η (None if never), and its median over the
    second half of the records (`late_median`, also as a ratio to 2/η)."""
    res = Results(Path(run_dir))
    curves = res.curves("lambda_max")
    out = []
    for rec in res.records():
        points = curves.get(rec["member"], [])
        if not points:
            continue
        steps = np.array([s for s, _ in points])
        lam = np.array([v for _, v in points])
        lr = rec.get("learning_rate", res.config["optimizer"]["learning_rate"])
        edge = 2.0 / lr
        # The first steps fit the targets' mean and can drop λ_max from its initial
        # value: sharpening is measured from the lowest point of the first half.
        dip = int(np.argmin(lam[: max(1, len(lam) // 2)]))
        reached = dip + np.nonzero(lam[dip:] >= 0.9 * edge)[0]
        late = lam[len(lam) // 2:]
        out.append({
            "member": rec["member"], "learning_rate": lr, "edge": edge,
            "status": rec["status"], "lambda_start": float(lam[0]),
            "dip_step": int(steps[dip]), "lambda_dip": float(lam[dip]),
            "lambda_peak": float(lam[dip:].max()),
            "reached_step": int(steps[reached[0]]) if reached.size else None,
            "late_median": float(np.median(late)),
            "late_ratio": float(np.median(late) / edge),
            "train_loss": rec["train_loss"],
        })
    return sorted(out, key=lambda r: r["learning_rate"])


def figure(run_dir: str | Path, path: str | Path, dpi: int = 90) -> None:
    """λ_max against steps for each step size with its 2/η line, and the training
    loss beneath."""
    res = Results(Path(run_dir))
    lams, losses = res.curves("lambda_max"), res.curves("train_loss")
    rows = summary(run_dir)
    fig = Figure(figsize=(6.4, 5.6))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, row in enumerate(rows):
        c = colors[i % len(colors)]
        s, v = zip(*lams[row["member"]])
        top.plot(s, v, color=c, lw=1.2, label=f"η = {row['learning_rate']:g}")
        top.axhline(row["edge"], color=c, ls="--", lw=0.9)
        if row["member"] in losses:
            s, v = zip(*losses[row["member"]])
            bottom.plot(s, v, color=c, lw=1.2)
    top.set_ylabel("λ_max (Hessian)")
    top.set_title("Full-batch GD, MSE: sharpness against steps (dashed: 2/η)", fontsize=10)
    top.legend(fontsize=8, loc="lower right")
    bottom.set_yscale("log")
    bottom.set_ylabel("train loss")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def report(run_dir: str | Path) -> list[str]:
    run_dir = Path(run_dir)
    rows = summary(run_dir)
    if not rows:
        return ["## Edge of stability", "", "No λ_max records: set `[record] every`."]
    figure(run_dir, run_dir / "edge_of_stability.png")

    def fmt(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    lines = ["## Edge of stability (Cohen et al. 2021)", "",
             "![λ_max against steps](edge_of_stability.png)", "",
             "| η | 2/η | λ_max at step 0 | lowest λ_max (step) | peak after | "
             "first step ≥ 0.9·2/η | median λ_max, 2nd half | ÷ 2/η | final train loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['learning_rate']:g} | {fmt(r['edge'])} | {fmt(r['lambda_start'])} "
                     f"| {fmt(r['lambda_dip'])} ({r['dip_step']}) "
                     f"| {fmt(r['lambda_peak'])} | {fmt(r['reached_step'])} | "
                     f"{fmt(r['late_median'])} | {fmt(r['late_ratio'])} | "
                     f"{fmt(r['train_loss'])} |")
    return lines
