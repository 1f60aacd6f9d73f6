"""`basin report DIR`: report.md and figures for a run directory.

The generalization gap here is train accuracy − test accuracy (`accuracy_gap`), the
quantity of Jiang et al. 2019; the loss gap is stored beside it as `gap`.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is
from scipy import stats

from experiments import config as cfglib
from experiments import measures as measurelib
from experiments import rundir
from experiments.store import Store

GAP = "accuracy_gap"
LABELS = {**measurelib.LABELS, GAP: "generalization gap (train − test accuracy)"}


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
            buckets.setdefault(tuple(_hashable(r[k]) for k in others), []).append(r)
        taus = [kendall_tau([r[measure] for r in b], [r[gap] for r in b])
                for b in buckets.values() if len(b) > 1]
        taus = [t for t in taus if not math.isnan(t)]
        per_axis[axis] = float(np.mean(taus)) if taus else math.nan
    vals = [v for v in per_axis.values() if not math.isnan(v)]
    return (float(np.mean(vals)) if vals else math.nan), per_axis


def _hashable(value):
    """A swept value as a dict key (a list such as `model.hidden` as a tuple)."""
    return tuple(map(_hashable, value)) if isinstance(value, list) else value


def _axes(cfg: dict, records: list[dict]) -> list[str]:
    return [k for k in cfglib.sweep_keys(cfg)
            if k != "seed" and len({_hashable(r[k]) for r in records}) > 1]


def _save(fig: Figure, path: Path) -> None:
    """PNG through `rundir.atomic_write` (a planted symlink is refused, not followed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    rundir.atomic_write(path, buf.getvalue())


# What turns a name into markup: code, emphasis, links and images, table cells. (An
# intraword `_` is not emphasis in CommonMark, so measure names stay readable.)
_MARKDOWN = re.compile(r"([\\`*\[\]!|])")


def escape(text) -> str:
    r"""`text` as literal Markdown: HTML escaped, Markdown punctuation backslashed and
    line breaks flattened, so a stored name can neither inject markup or a remote
    image nor break a table row.

    >>> print(escape("<img src=x>![a](http://e/x.png)"))
    &lt;img src=x&gt;\!\[a\](http://e/x.png)
    """
    flat = " ".join(str(text).split())
    return _MARKDOWN.sub(r"\\\1", html.escape(flat, quote=False))


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
    _save(fig, path)


def heatmap_cells(records: list[dict], key: str) -> tuple[np.ndarray, list[list[str]]]:
    """The heatmap of `key` over (batch size, learning rate): the mean over the
    non-diverged seeds of each cell, and each cell's label, which marks diverged
    members ("diverged" if all did, "0.91 (1/2 div.)" if some did, "—" if none ran).

    >>> heatmap_cells([{"batch_size": 8, "learning_rate": 0.1, "status": "diverged",
    ...                 "test_accuracy": float("nan")}], "test_accuracy")[1]
    [['diverged']]
    """
    bss = sorted({r["batch_size"] for r in records})
    lrs = sorted({r["learning_rate"] for r in records})
    grid = np.full((len(bss), len(lrs)), np.nan)
    labels = [["—"] * len(lrs) for _ in bss]
    for (i, b), (j, lr) in itertools.product(enumerate(bss), enumerate(lrs)):
        cell = [r for r in records if r["batch_size"] == b and r["learning_rate"] == lr]
        if not cell:
            continue
        diverged = sum(r["status"] == "diverged" for r in cell)
        vals = [r[key] for r in cell if r["status"] != "diverged" and np.isfinite(r[key])]
        if vals:
            grid[i, j] = np.mean(vals)
            labels[i][j] = f"{grid[i, j]:.3g}" + (
                f"\n({diverged}/{len(cell)} div.)" if diverged else "")
        else:
            labels[i][j] = "diverged" if diverged else "—"
    return grid, labels


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
        grid, labels = heatmap_cells(records, key)
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma")
        for (i, j), v in np.ndenumerate(grid):
            if "div" in labels[i][j]:  # hatch the cells where members diverged
                ax.add_patch(matplotlib.patches.Rectangle(
                    (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor="0.6",
                    linewidth=0))
            # An empty (NaN) cell is blank paper: dark text; a value, the contrast colour.
            dark = np.isnan(v) or v >= np.nanmean(grid)
            ax.text(j, i, labels[i][j], ha="center", va="center",
                    color="k" if dark else "w", fontsize=8)
        ax.set_xticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set_yticks(range(len(bss)), [str(b) for b in bss])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("batch size")
        ax.set_title(f"{title} (mean over non-diverged seeds)")
        fig.colorbar(im, ax=ax)
    _save(fig, path)
    return True


def _curves(curves: dict, records, path: Path) -> None:
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
    _save(fig, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.4g}"
    return escape(v)


def kendall_section(records: list[dict], measures: list[str], axes: list[str]) -> list[str]:
    """The Markdown table of Kendall τ and granulated Ψ (one column ψ per swept axis
    that varies), or a note when fewer than two members give no ranking."""
    lines = ["## Sharpness against the generalization gap", ""]
    if len(records) < 2:
        return lines + [f"Kendall τ needs ≥ 2 points; this run has {len(records)}.", ""]
    lines += ["| " + " | ".join(["measure", "Kendall τ", "granulated Ψ"] +
                                [f"ψ({escape(a)})" for a in axes]) + " |",
              "|---|---|---|" + "---|" * len(axes)]
    for m in measures:
        psi, per = granulated_kendall(records, m, axes)
        tau = kendall_tau([r[m] for r in records], [r[GAP] for r in records])
        lines.append("| " + " | ".join([escape(LABELS.get(m, m)), _fmt(tau), _fmt(psi)] +
                                       [_fmt(per[a]) for a in axes]) + " |")
    return lines + ["", "![sharpness against gap](sharpness_vs_gap.png)", ""]


def _header(cfg: dict) -> list[str]:
    return [f"# {escape(cfg['name'])}", "", escape(cfg.get("description", "")), ""]


def _read_run(path: Path, cfg: dict | None) -> tuple[dict, list[dict], dict, list[dict]]:
    """The config, the records and the training curves of a sweep run, read without
    writing to the store (a read-only run directory reports too)."""
    if not (path / rundir.STORE).is_file():
        raise cfglib.ConfigError(f"{path} is not a run directory (no {rundir.STORE})")
    cfg = rundir.read_config(path) if cfg is None else cfg
    with Store(path / rundir.STORE, readonly=True) as store:
        records, curves, times = store.records(), store.curves("train_loss"), store.timings()
    if not records:
        raise cfglib.ConfigError(f"{path} has no finished groups yet")
    return cfg, records, curves, times


def time_line(times: list[dict]) -> str:
    """Where the groups' time went, in one line (parts a store did not keep are left
    out)."""
    def total(key):
        values = [t[key] for t in times]
        return None if any(v is None for v in values) else sum(values)

    parts = [f"{name} {total(key):.1f} s" for name, key in (
        ("compiling", "compile_seconds"), ("training", "train_seconds"),
        ("measuring", "measure_seconds")) if total(key) is not None]
    return (f"{len(times)} group(s) took {total('seconds') or 0:.1f} s"
            + (f" ({', '.join(parts)})" if parts else "") + ".")


def write_lines(run_dir: str | Path, cfg: dict, lines: list[str]) -> Path:
    """Write `report.md` as the config's header followed by `lines` (a custom study's
    report)."""
    path = Path(run_dir)
    rundir.check_writable(path, "write the report")
    return rundir.atomic_write(path / "report.md", "\n".join(_header(cfg) + lines) + "\n")


def write_sweep_report(run_dir: str | Path, cfg: dict | None = None,
                 extra: list[str] = ()) -> Path:
    """Write a sweep's `report.md` and PNG figures into `run_dir`, followed by `extra`
    lines (a sweep study's own section); return the report's path. `cfg` is the run's
    validated config (default: read unvalidated; `experiments.write_report` validates it
    and dispatches custom studies).

    Stored names are escaped (`escape`), every file is written atomically and a
    symbolic link in its place is refused (`rundir.atomic_write`).
    """
    path = Path(run_dir)
    if path.is_dir():
        rundir.check_links(path)
    cfg, records, curves, times = _read_run(path, cfg)
    rundir.check_writable(path, "write the report")
    measures = [m for m in measurelib.CURVATURE if m in records[0]]
    axes = _axes(cfg, records)
    lines = _header(cfg) + [f"{len(records)} members; statuses: " + ", ".join(
        f"{s} {sum(r['status'] == s for r in records)}"
        for s in sorted({r['status'] for r in records})) + ". " + time_line(times), ""]
    if measures:
        if len(records) >= 2:
            _scatter(records, measures, path / "sharpness_vs_gap.png")
        lines += kendall_section(records, measures, axes)
    if _heatmaps(records, path / "heatmaps.png"):
        lines += ["## Over batch size and learning rate", "", "![heatmaps](heatmaps.png)", ""]
    _curves(curves, records, path / "training_curves.png")
    lines += ["## Training", "", "![training curves](training_curves.png)", ""]
    cols = cfglib.sweep_keys(cfg) + ["status", "steps", "train_loss", "train_accuracy",
                                        "test_accuracy", GAP] + measures
    lines += ["## Members", "", "| " + " | ".join(escape(c) for c in cols) + " |",
              "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in records]
    if extra:
        lines += [""] + list(extra)
    return rundir.atomic_write(path / "report.md", "\n".join(lines) + "\n")
