"""Adaptive edge of stability (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge
of Stability").

Claim: under full-batch Adam with learning rate η and momentum β₁, the *preconditioned*
sharpness λ₁(P⁻¹H), P = √v̂ + ε the preconditioner of the latest step, rises until it
reaches (2 + 2β₁)/((1 − β₁)η), 38/η at β₁ = 0.9, the largest value at which the
preconditioned iteration with momentum is stable on a quadratic, and then hovers there;
the raw sharpness λ_max of H, which plain GD's 2/η would bound, is not held at any such
line.

The config trains one MLP with MSE on one-hot targets by full-batch Adam
(`batch_size = num_train`) at three learning rates, recording λ₁(P⁻¹H)
(`preconditioned_lambda_max`, P read from each member's optimizer state inside the
group program) and λ_max every few steps. The report plots both against steps with the
38/η lines and tabulates, per learning rate, the first step λ₁(P⁻¹H) reached 0.9·38/η,
its median over the second half of training against 38/η, and the raw λ_max there
against 2/η.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from experiments.report import Figure
from experiments.sweep import Results

NAME = "adaptive_edge_of_stability"
SWEEP = True


def edge(learning_rate: float, b1: float) -> float:
    """(2 + 2β₁)/((1 − β₁)η): the stability threshold of λ₁(P⁻¹H) for Adam."""
    return (2 + 2 * b1) / ((1 - b1) * learning_rate)


def _finite(points):
    pts = [(s, v) for s, v in points if v is not None and math.isfinite(v)]
    return np.array([s for s, _ in pts]), np.array([v for _, v in pts])


def summary(run_dir: str | Path) -> list[dict]:
    """Per member: learning rate, the threshold 38/η (for the config's β₁), the first
    step λ₁(P⁻¹H) reached 0.9 of it (None if never), its peak, its median over the
    second half of the records (`late_median`, also as `late_ratio` to the threshold),
    and the raw λ_max's median there against 2/η (`raw_ratio`)."""
    res = Results(Path(run_dir))
    pre, raw = res.curves("preconditioned_lambda_max"), res.curves("lambda_max")
    b1 = float(res.config["optimizer"].get("b1", 0.9))
    out = []
    for rec in res.records():
        steps, lam = _finite(pre.get(rec["member"], []))
        if not lam.size:
            continue
        lr = rec.get("learning_rate", res.config["optimizer"]["learning_rate"])
        line = edge(lr, b1)
        reached = np.nonzero(lam >= 0.9 * line)[0]
        half = steps >= steps[-1] / 2
        _, r = _finite([(s, v) for s, v in raw.get(rec["member"], [])
                        if s >= steps[-1] / 2])
        raw_median = float(np.median(r)) if r.size else math.nan
        out.append({
            "member": rec["member"], "learning_rate": lr, "b1": b1, "edge": line,
            "status": rec["status"], "lambda_first": float(lam[0]),
            "reached_step": int(steps[reached[0]]) if reached.size else None,
            "lambda_peak": float(lam.max()),
            "late_median": float(np.median(lam[half])),
            "late_ratio": float(np.median(lam[half]) / line),
            "raw_late_median": raw_median, "raw_ratio": raw_median * lr / 2,
            "train_loss": rec["train_loss"],
        })
    return sorted(out, key=lambda r: r["learning_rate"])


def figure(run_dir: str | Path, path: str | Path, dpi: int = 90) -> None:
    """λ₁(P⁻¹H)·η against steps with the (2 + 2β₁)/(1 − β₁) line, the raw λ_max·η with
    the GD line 2, and the training loss beneath."""
    res = Results(Path(run_dir))
    pre, raw = res.curves("preconditioned_lambda_max"), res.curves("lambda_max")
    losses = res.curves("train_loss")
    rows = summary(run_dir)
    fig = Figure(figsize=(6.4, 6.4))
    top, mid, bottom = fig.subplots(3, 1, sharex=True,
                                    gridspec_kw={"height_ratios": [3, 2, 2]})
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, row in enumerate(rows):
        c, lr = colors[i % len(colors)], row["learning_rate"]
        s, v = _finite(pre[row["member"]])
        top.plot(s, v, color=c, lw=1.2, label=f"η = {lr:g}")
        top.axhline(row["edge"], color=c, ls="--", lw=0.9)
        s, v = _finite(raw.get(row["member"], []))
        if v.size:
            mid.plot(s, v * lr / 2, color=c, lw=1.2)
        if row["member"] in losses:
            s, v = zip(*losses[row["member"]])
            bottom.plot(s, v, color=c, lw=1.2)
    b1 = rows[0]["b1"] if rows else 0.9
    top.set_ylabel("λ₁(P⁻¹H)")
    top.set_yscale("log")
    top.set_title(f"Full-batch Adam (β₁ = {b1:g}), MSE: preconditioned sharpness "
                  f"(dashed: {(2 + 2 * b1) / (1 - b1):g}/η)", fontsize=10)
    top.legend(fontsize=8, loc="lower right")
    mid.axhline(1.0, color="k", ls="--", lw=0.9)
    mid.set_ylabel("raw λ_max ÷ (2/η)")
    bottom.set_yscale("log")
    bottom.set_ylabel("train loss")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def report(run_dir: str | Path) -> list[str]:
    run_dir = Path(run_dir)
    rows = summary(run_dir)
    if not rows:
        return ["## Adaptive edge of stability", "",
                "No preconditioned_lambda_max records: set `[record] every` and "
                "`measures`."]
    figure(run_dir, run_dir / "adaptive_edge_of_stability.png")

    def fmt(x):
        return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"

    lines = ["## Adaptive edge of stability (Cohen et al. 2022)", "",
             "![λ₁(P⁻¹H) against steps](adaptive_edge_of_stability.png)", "",
             "| η | (2+2β₁)/((1−β₁)η) | first step ≥ 0.9× | peak λ₁(P⁻¹H) | "
             "median λ₁(P⁻¹H), 2nd half | ÷ threshold | median raw λ_max, 2nd half | "
             "÷ 2/η | final train loss |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['learning_rate']:g} | {fmt(r['edge'])} | "
                     f"{fmt(r['reached_step'])} | {fmt(r['lambda_peak'])} | "
                     f"{fmt(r['late_median'])} | {fmt(r['late_ratio'])} | "
                     f"{fmt(r['raw_late_median'])} | {fmt(r['raw_ratio'])} | "
                     f"{fmt(r['train_loss'])} |")
    return lines
