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


def by(records: Iterable[dict], key: Callable[[dict], object] | str) -> dict:
    """Members bucketed by a swept value (a record key) or any function of a record,
    buckets in sorted order of that value."""
    fn = (lambda r: r[key]) if isinstance(key, str) else key
    out: dict = {}
    for r in records:
        out.setdefault(fn(r), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: kv[0]))


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std 0 for one value)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


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
