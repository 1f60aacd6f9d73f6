"""Resumable pieces of a custom study's `results.json` (shared by the D2 studies)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from experiments import studies
from experiments.config import ConfigError

RESULTS = "results.json"


def piece(run_dir: Path, key: str, compute: Callable[[], Any], log) -> Any:
    """The stored value of `key` in `run_dir/results.json`, or `compute()` stored there
    (so a resumed run skips what an interrupted one finished)."""
    path = Path(run_dir) / RESULTS
    done = studies.load_json(path, {})
    if key in done:
        log(f"{key}: already stored, skipped")
        return done[key]
    value = compute()
    done = studies.load_json(path, {})
    done[key] = value
    studies.save_json(path, done)
    return value


def results(run_dir: Path) -> dict:
    return studies.load_json(Path(run_dir) / RESULTS, {})


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def positive_int(cfg: dict, *keys: str) -> None:
    for key in keys:
        v = cfg[key]
        check(isinstance(v, int) and not isinstance(v, bool) and v > 0,
              f"{key} must be a positive integer, got {v!r}")


def positive_number(cfg: dict, *keys: str) -> None:
    for key in keys:
        v = cfg[key]
        check(number(v) and v > 0, f"{key} must be a number > 0, got {v!r}")
