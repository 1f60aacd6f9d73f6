"""`basin report DIR`: report.md and figures for a run directory.

The generalization gap here is train accuracy − test accuracy (`accuracy_gap`), the
quantity of Jiang et al. 2019; the loss gap is stored beside it as `gap`.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
from scipy import stats

from experiments import config as cfglib
from experiments.sweep import Results

GAP = "accuracy_gap"
CURVATURE = ("lambda_max", "trace", "worst_case", "adaptive", "random", "keskar",
             "pac_bayes", "noise_scale")
LABELS = {"lambda_max": "λ_max of the Hessian", "trace": "trace of the Hessian",
          "worst_case": "worst-case ρ-sharpness", "adaptive": "adaptive sharpness",
          "random": "random sharpness", "keskar": "Keskar ε-sharpness",
          "pac_bayes": "PAC-Bayes flatness 1/σ²", "noise_scale": "gradient noise scale",
          GAP: "generalization gap (train − test accuracy)"}


def kendall_tau(x, y) -> float:
    """Kendall's τ-b over the finite pairs (scipy.stats.kendalltau)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2:
        return math.nan
    return float(stats.kendalltau(x[ok], y[ok]).statistic)


def granulated_kendall(records: list[dict], measure: str, axes: list[str],
                       gap: str = GAP) -> tuple[float, dict[str, float]]:
    """Jiang et al. 2019's granulated Kendall coefficient Ψ and its per-axis terms ψ_i.

    For axis i, members are grouped by the values of every other swept key; τ between
    the measure and the gap is taken inside each group (where only axis i varies) and
    averaged; Ψ is the mean of ψ_i over the axes.
    """
    per_axis = {}
    keys = [k for k in records[0] if k in axes or k == "seed"] if records else []
    for axis in axes:
        others = [k for k in keys if k != axis]
        buckets: dict[tuple, list[dict]] = {}
        for r in records:
            buckets.setdefault(tuple(r[k] for k in others), []).append(r)
        taus = [kendall_tau([r[measure] for r in b], [r[gap] for r in b])
                for b in buckets.values() if len(b) > 1]
        taus = [t for t in taus if not math.isnan(t)]
        per_axis[axis] = float(np.mean(taus)) if taus else math.nan
    vals = [v for v in per_axis.values() if not math.isnan(v)]
    return (float(np.mean(vals)) if vals else math.nan), per_axis


def _axes(cfg: dict, records: list[dict]) -> list[str]:
    return [k for k in cfglib.sweep_keys(cfg) if k != "seed" and len({r[k] for r in records}) > 1]


def _scatter(records, measures, path: Path) -> None:
    n = len(measures)
    fig = Figure(figsize=(4.2 * n, 3.6))
    axs = fig.subplots(1, n, squeeze=False)
    batch = np.array([r.get("batch_size", 0) for r in records], float)
    norm = matplotlib.colors.LogNorm(vmin=max(batch.min(), 1), vmax=max(batch.max(), 2))
    for ax, m in zip(axs[0], measures):
        x = np.array([r[m] for r in records], float)
        y = np.array([r[GAP] for r in records], float)
        sc = ax.scatter(x, y, c=batch, cmap="viridis", norm=norm, s=36, edgecolor="k",
                        linewidth=0.4)
        ax.set_xlabel(LABELS.get(m, m))
        ax.set_title(f"τ = {kendall_tau(x, y):+.2f}")
        if np.all(x[np.isfinite(x)] > 0) and np.nanmax(x) / max(np.nanmin(x), 1e-12) > 20:
            ax.set_xscale("log")
    axs[0][0].set_ylabel(LABELS[GAP])
    fig.colorbar(sc, ax=axs[0].tolist(), label="batch size")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _heatmaps(records, path: Path) -> bool:
    if not records or "batch_size" not in records[0] or "learning_rate" not in records[0]:
        return False
    bss = sorted({r["batch_size"] for r in records})
    lrs = sorted({r["learning_rate"] for r in records})
    panels = [("test_accuracy", "test accuracy")] + (
        [("lambda_max", "λ_max")] if "lambda_max" in records[0] else [])
    fig = Figure(figsize=(5.4 * len(panels), 3.8))
    axs = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"wspace": 0.35})
    for ax, (key, title) in zip(axs[0], panels):
        grid = np.full((len(bss), len(lrs)), np.nan)
        for i, b in enumerate(bss):
            for j, lr in enumerate(lrs):
                vals = [r[key] for r in records if r["batch_size"] == b
                        and r["learning_rate"] == lr and np.isfinite(r[key])]
                if vals:
                    grid[i, j] = np.mean(vals)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma")
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, "diverged" if np.isnan(v) else f"{v:.3g}", ha="center",
                    va="center", color="w" if np.isnan(v) or v < np.nanmean(grid) else "k",
                    fontsize=8)
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(bss)), [str(b) for b in bss])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("batch size")
        ax.set_title(f"{title} (mean over seeds)")
        fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return True


def _curves(results: Results, records, path: Path) -> None:
    curves = results.curves("train_loss")
    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    batch = [r.get("batch_size", 0) for r in records]
    norm = matplotlib.colors.LogNorm(vmin=max(min(batch), 1), vmax=max(max(batch), 2))
    cmap = matplotlib.colormaps["viridis"]
    for r in records:
        pts = curves.get(r["member"], [])
        if pts:
            s, v = zip(*pts)
            ax.plot(s, v, color=cmap(norm(max(r.get("batch_size", 1), 1))), lw=1, alpha=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over each record window)")
    ax.set_title("training curves, coloured by batch size")
    fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax,
                 label="batch size")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _fmt(v) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` and PNG figures into `run_dir`; return the report's path."""
    from experiments import studies

    path = Path(run_dir)
    if (path / "config.json").is_file():
        cfg = Results(path).config
        module = studies.get(cfg.get("study", studies.SWEEP))
        if module is not None and not module.SWEEP:
            lines = [f"# {cfg['name']}", "", cfg.get("description", ""), ""]
            out = path / "report.md"
            out.write_text("\n".join(lines + module.report(path)) + "\n")
            return out
    if not (path / "results.sqlite").is_file():
        raise cfglib.ConfigError(f"{path} is not a run directory (no results.sqlite)")
    results = Results(path)
    cfg = results.config
    records = results.records()
    if not records:
        raise cfglib.ConfigError(f"{path} has no finished groups yet")
    measures = [m for m in CURVATURE if m in records[0]]
    axes = _axes(cfg, records)
    lines = [f"# {cfg['name']}", "", cfg.get("description", ""), "",
             f"{len(records)} members; statuses: " + ", ".join(
                 f"{s} {sum(r['status'] == s for r in records)}"
                 for s in sorted({r['status'] for r in records})) + ".", ""]
    if measures:
        _scatter(records, measures, path / "sharpness_vs_gap.png")
        lines += ["## Sharpness against the generalization gap", "",
                  "| measure | Kendall τ | granulated Ψ | " +
                  " | ".join(f"ψ({a})" for a in axes) + " |",
                  "|---|---|---|" + "---|" * len(axes)]
        for m in measures:
            psi, per = granulated_kendall(records, m, axes)
            tau = kendall_tau([r[m] for r in records], [r[GAP] for r in records])
            lines.append(f"| {LABELS.get(m, m)} | {_fmt(tau)} | {_fmt(psi)} | " +
                         " | ".join(_fmt(per[a]) for a in axes) + " |")
        lines += ["", "![sharpness against gap](sharpness_vs_gap.png)", ""]
    if _heatmaps(records, path / "heatmaps.png"):
        lines += ["## Over batch size and learning rate", "", "![heatmaps](heatmaps.png)", ""]
    _curves(results, records, path / "training_curves.png")
    lines += ["## Training", "", "![training curves](training_curves.png)", ""]
    cols = cfglib.sweep_keys(cfg) + ["status", "steps", "train_loss", "train_accuracy",
                                        "test_accuracy", GAP] + measures
    lines += ["## Members", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in records]
    module = studies.get(cfg.get("study", studies.SWEEP))
    if module is not None:
        lines += [""] + module.report(path)
    out = path / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out
