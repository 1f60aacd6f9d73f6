"""Gradient noise and the critical batch size (McCandlish et al. 2018, "An empirical
model of large-batch training").

Claim: the steps S and examples E = B·S that SGD needs to reach a given loss trade
off along a hyperbola, S = S_min (1 + B_noise / B) and E = E_min (1 + B / B_noise):
below the critical batch size B_noise a bigger batch saves steps almost linearly, above
it only examples are wasted. B_noise is predicted by the gradient noise scale
B_simple = tr Σ / |G|², measured from per-example gradients alone.

The config sweeps batch size × learning rate (× seed) with plain SGD at a constant
learning rate and stops each member when its training loss reaches
`train.until_train_loss`. For each batch size the learning rate is tuned to the fewest
steps (as in the paper); the hyperbola is fitted to those S(B), and its B_noise is set
beside B_simple: recorded along training (`[record]` with `noise_scale`) and read
where the tuned members' training loss was within 1–3× the target, or, without
records, the `noise_scale` measure at the point where each tuned member stopped.
"""

from __future__ import annotations

import functools

import math
from pathlib import Path

import matplotlib
import numpy as np

from experiments.report import Figure

from experiments.studies import _summary
from experiments.studies._summary import cell as fmt, grouped
from experiments.sweep import Results

mean_std = functools.partial(_summary.mean_std, ddof=0)  # population std, as tabled

NAME = "critical_batch_size"
SWEEP = True


def fit_steps_batch(batch_sizes, steps) -> tuple[float, float]:
    """(S_min, B_noise) of S = S_min (1 + B_noise / B), fitted to measured steps.

    The model is linear in 1/B (S = S_min + S_min·B_noise · 1/B); it is solved by least
    squares on relative errors (each row divided by its S), since the steps span
    orders of magnitude across batch sizes.
    """
    b = np.asarray(batch_sizes, float)
    s = np.asarray(steps, float)
    ok = np.isfinite(b) & np.isfinite(s) & (s > 0)
    if ok.sum() < 2:
        return math.nan, math.nan
    b, s = b[ok], s[ok]
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    (a, c), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    return float(a), float(c / a) if a > 0 else math.nan


def tuned_steps(records: list[dict]) -> list[dict]:
    """Per batch size: the learning rate whose seeds all converged in the fewest mean
    steps, those steps, their examples B·S and the seeds' mean noise scale there.
    Batch sizes where no learning rate converged for every seed are left out."""
    out = []
    for (bs,), recs in grouped(records, "batch_size").items():
        best = None
        for (lr,), rs in grouped(recs, "learning_rate").items():
            if not all(r["status"] == "converged" for r in rs):
                continue
            steps = mean_std(r["steps"] for r in rs)[0]
            if best is None or steps < best["steps"]:
                best = {"batch_size": bs, "learning_rate": lr, "steps": steps,
                        "examples": bs * steps, "members": [r.get("member") for r in rs],
                        "noise_scale": mean_std(r.get("noise_scale", math.nan)
                                                for r in rs)[0]}
        if best is not None:
            out.append(best)
    return out


def noise_scale_near_target(rows: list[dict], train_loss: dict, noise_scale: dict,
                            target: float, factor: float = 3.0) -> list[float]:
    """B_simple recorded along training by the tuned members, at the records where the
    training loss (the window mean ending there) was between `target` and
    `factor`·`target`: the noise scale on the way into the target, many readings per
    member instead of the one at the stopping point."""
    out = []
    for row in rows:
        for member in row["members"]:
            loss = dict(train_loss.get(member, []))
            out += [v for step, v in noise_scale.get(member, [])
                    if step in loss and target <= loss[step] <= factor * target
                    and np.isfinite(v)]
    return out


def _figure(rows: list[dict], s_min: float, b_noise: float, b_simple: float,
            path: Path, along: tuple | None = None) -> None:
    b = np.array([r["batch_size"] for r in rows], float)
    s = np.array([r["steps"] for r in rows], float)
    lr = np.array([r["learning_rate"] for r in rows], float)
    grid = np.geomspace(b.min() / 2, b.max() * 2, 200)
    fig = Figure(figsize=(20 if along else 15, 4))
    axes = fig.subplots(1, 4 if along else 3, gridspec_kw={"wspace": 0.3})
    ax_s, ax_e, ax_lr = axes[:3]
    ax_s.plot(b, s, "o", color="tab:blue", label="measured (lr tuned per B)")
    ax_e.plot(b, b * s, "o", color="tab:blue", label="measured")
    if np.isfinite(b_noise):
        ax_s.plot(grid, s_min * (1 + b_noise / grid), color="k", lw=1,
                  label=f"S_min (1 + B_noise/B): S_min={s_min:.0f}, B_noise={b_noise:.0f}")
        ax_s.axhline(s_min, color="k", ls=":", lw=1)
        e_min = s_min * b_noise
        ax_e.plot(grid, e_min * (1 + grid / b_noise), color="k", lw=1,
                  label=f"E_min (1 + B/B_noise): E_min={e_min:.3g}")
        ax_e.axhline(e_min, color="k", ls=":", lw=1)
    for ax in (ax_s, ax_e):
        if np.isfinite(b_noise):
            ax.axvline(b_noise, color="k", ls="--", lw=1, label="fitted B_noise")
        if np.isfinite(b_simple):
            ax.axvline(b_simple, color="tab:red", ls="--", lw=1,
                       label=f"measured B_simple ≈ {b_simple:.0f}")
        ax.set(xscale="log", yscale="log", xlabel="batch size B")
        ax.legend(fontsize=7, loc="upper right" if ax is ax_s else "upper left")
    ax_s.set(ylabel="steps to the target loss S", title="steps against batch size")
    ax_e.set(ylabel="examples to the target loss E = B·S", title="examples against batch size")
    ax_lr.plot(b, lr, "o-", color="tab:green")
    ax_lr.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="tuned learning rate",
              title="fastest learning rate per batch size")
    if along:
        _noise_panel(axes[3], rows, *along, b_noise)
    fig.savefig(path, dpi=90, bbox_inches="tight")


def _noise_panel(ax, rows, train_loss, noise_scale, target, b_noise) -> None:
    cmap = matplotlib.colormaps["viridis"]
    for k, row in enumerate(rows):
        for j, member in enumerate(row["members"]):
            loss = dict(train_loss.get(member, []))
            pts = [(loss[s], v) for s, v in noise_scale.get(member, []) if s in loss]
            if pts:
                ax.plot(*zip(*pts), ".-", color=cmap(k / max(len(rows) - 1, 1)), lw=0.8,
                        ms=3, label=f"B = {row['batch_size']}" if j == 0 else None)
    if np.isfinite(b_noise):
        ax.axhline(b_noise, color="k", ls="--", lw=1, label="fitted B_noise")
    ax.axvspan(target, 3 * target, color="tab:red", alpha=0.1, label="read here")
    ax.set(xscale="log", yscale="log", xlabel="training loss (window mean)",
           ylabel="B_simple", title="noise scale along training (tuned members)")
    ax.invert_xaxis()
    ax.legend(fontsize=6, ncol=2)


def report(run_dir) -> list[str]:
    """The fit of S(B), the comparison with B_simple, a table and
    `critical_batch_size.png`."""
    path = Path(run_dir)
    results = Results(path)
    records = results.records()
    target = results.config["train"]["until_train_loss"]
    rows = tuned_steps(records)
    s_min, b_noise = fit_steps_batch([r["batch_size"] for r in rows],
                                     [r["steps"] for r in rows])
    train_loss, recorded = results.curves("train_loss"), results.curves("noise_scale")
    along = noise_scale_near_target(rows, train_loss, recorded, target) if recorded else []
    if along:
        simple, where = along, (f"recorded along training where the training loss was "
                                f"between {target:g} and {3 * target:g} (median of "
                                f"{len(along)} readings by the tuned members; "
                                f"quartiles {np.percentile(along, 25):.3g} to "
                                f"{np.percentile(along, 75):.3g})")
    else:
        simple = [r["noise_scale"] for r in rows if np.isfinite(r["noise_scale"])]
        where = "at the target (median over the tuned members)"
    b_simple = float(np.median(simple)) if simple else math.nan
    _figure(rows, s_min, b_noise, b_simple, path / "critical_batch_size.png",
            (train_loss, recorded, target) if recorded else None)
    lines = ["## Critical batch size", "",
             f"Steps S to a training loss of {target:g} at each batch size B, the learning "
             "rate tuned per B to the fewest steps (all seeds converged). Fit "
             f"S = S_min (1 + B_noise/B): S_min = {fmt(s_min)}, B_noise = {fmt(b_noise)}. "
             f"Gradient noise scale B_simple = tr Σ/|G|² {where}: {fmt(b_simple)}"
             + (f", {b_simple / b_noise:.2f}× the fitted B_noise." if np.isfinite(
                 b_simple / b_noise) else "."), "",
             "| batch size | tuned lr | steps S | fit S | examples E | B_simple where it stopped |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        fit = s_min * (1 + b_noise / r["batch_size"]) if np.isfinite(b_noise) else math.nan
        lines.append(f"| {r['batch_size']} | {r['learning_rate']:g} | {r['steps']:.0f} | "
                     f"{fit:.0f} | {fmt(float(r['examples']))} | "
                     f"{fmt(r['noise_scale'])} |")
    missing = sorted({r["batch_size"] for r in records} - {r["batch_size"] for r in rows})
    if missing:
        lines += ["", "No learning rate reached the target for every seed at batch sizes "
                  + ", ".join(map(str, missing)) + " (left out of the fit)."]
    lines += ["", "![critical batch size](critical_batch_size.png)", ""]
    return lines
