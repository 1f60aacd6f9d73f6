"""Small helpers the sweep studies share: records grouped by swept values, seed means,
the mean curve of a set of members, and markdown number formatting."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np


def grouped(records: Iterable[dict], *keys: str) -> dict[tuple, list[dict]]:
    """Records bucketed by the values of `keys`, buckets in sorted key order."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: tuple(map(_sortable, kv[0]))))


def _sortable(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard deviation (ddof 0) over the finite values; NaN if none."""
    v = np.asarray([x for x in values if x is not None], float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


def mean_curve(curves: dict[int, list[tuple[int, float]]], members: Iterable[int]
               ) -> tuple[np.ndarray, np.ndarray]:
    """Steps and the mean over `members` of a recorded curve, on the steps every member
    recorded (members stop at different steps when they converge or diverge)."""
    series = [dict(curves[m]) for m in members if curves.get(m)]
    if not series:
        return np.zeros(0), np.zeros(0)
    steps = sorted(set.intersection(*(set(s) for s in series)))
    return np.asarray(steps), np.asarray([np.mean([s[t] for s in series]) for t in steps])


def fmt(v, digits: int = 3) -> str:
    if isinstance(v, float):
        return "—" if math.isnan(v) else f"{v:.{digits}g}"
    return str(v)


def pm(values: Iterable[float], digits: int = 3) -> str:
    """`mean ± std` over seeds, for tables (`digits=0`: whole numbers, as for steps)."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "—"
    return f"{m:.0f} ± {s:.0f}" if digits == 0 else f"{m:.{digits}g} ± {s:.1g}"
