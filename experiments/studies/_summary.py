"""Helpers the sweep studies share: members grouped by swept values, means and spreads,
markdown tables. Private to `experiments.studies` (not a study: the name starts with _)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from experiments.sweep import Results


def finished(records: list[dict]) -> list[dict]:
    """The members that did not diverge (their measures are finite)."""
    return [r for r in records if r["status"] != "diverged"]


def by(records: Iterable[dict], key: Callable[[dict], object] | str,
       sort: Callable = lambda k: k) -> dict:
    """Members bucketed by a swept value (a record key) or any function of a record,
    buckets in sorted order of `sort(value)`."""
    fn = (lambda r: r[key]) if isinstance(key, str) else key
    out: dict = {}
    for r in records:
        out.setdefault(fn(r), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: sort(kv[0])))


def mean_std(values: Iterable[float], ddof: int = 1) -> tuple[float, float]:
    """Mean and standard deviation (`ddof` 1: sample, 0: population) of the finite
    values; NaN if none, std 0 for a single value."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=ddof)) if v.size > ddof else 0.0


def grouped(records: Iterable[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Records bucketed by the values of several `keys`, buckets in sorted key order
    (numbers before strings)."""
    return by(records, lambda r: tuple(r[k] for k in keys), sort=lambda k: tuple(
        (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in k))


def mean_curve(curves: dict[int, list[tuple[int, float]]], members: Iterable[int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the mean over `members` of a recorded curve, on the steps every member
    recorded (members stop at different steps when they converge or diverge)."""
    series = [dict(curves[m]) for m in members if curves.get(m)]
    if not series:
        return np.zeros(0), np.zeros(0)
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.asarray(steps), np.asarray([np.mean([s[t] for s in series]) for t in steps])


def cell(v, digits: int = 3) -> str:
    """A table cell: a float to `digits` significant digits ("—" for NaN), else str."""
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def pm(values: Iterable[float], digits: int = 3) -> str:
    """`mean ± std` (population std) over seeds, for tables (`digits=0`: whole numbers,
    as for steps)."""
    m, s = mean_std(values, ddof=0)
    if math.isnan(m):
        return "—"
    return f"{m:.0f} ± {s:.0f}" if digits == 0 else f"{m:.{digits}g} ± {s:.1g}"


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    if math.isnan(mean):
        return "—"
    text = f"{mean:.{digits}g}"
    return text if std is None or std == 0 else f"{text} ± {std:.2g}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] +
            ["| " + " | ".join(row) + " |" for row in rows])


def load(run_dir) -> tuple[dict, list[dict]]:
    """The run's resolved config and its member records."""
    results = Results(Path(run_dir))
    return results.config, results.records()


def seed_dots(ax, groups: Iterable[list[dict]], key: str) -> None:
    """One column per group on `ax`: a dot per member (seed) and a bar at their mean."""
    for i, members in enumerate(groups):
        vals = np.array([r[key] for r in members], float)
        ax.scatter(np.full(vals.shape, i) + np.linspace(-0.08, 0.08, len(vals)), vals,
                   color=f"C{i}", s=28, edgecolor="k", linewidth=0.4, zorder=3)
        ax.hlines(np.nanmean(vals), i - 0.25, i + 0.25, color=f"C{i}", lw=2)
