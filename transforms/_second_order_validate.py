"""Hyper-parameter checks shared by Shampoo, SOAP and K-FAC (static values only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from landscape._validate import choice, positive_int  # noqa: F401  (re-exported)


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer,
                                                              np.floating))


def decay(value: Any, name: str, allow_one: bool = False) -> float:
    """A decay rate in [0, 1) (or [0, 1] with `allow_one`)."""
    top = "1]" if allow_one else "1)"
    if not _is_number(value) or not (0.0 <= value < 1.0 or (allow_one and value == 1.0)):
        raise ValueError(f"`{name}` must be a number in [0, {top}; got {value!r}.")
    return float(value)


def positive(value: Any, name: str) -> float:
    if not _is_number(value) or not value > 0 or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a positive finite number; got {value!r}.")
    return float(value)


def non_negative(value: Any, name: str) -> float:
    if not _is_number(value) or not value >= 0 or not np.isfinite(value):
        raise ValueError(f"`{name}` must be a non-negative finite number; got {value!r}.")
    return float(value)


def non_negative_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"`{name}` must be a non-negative integer; got {value!r}.")
    return int(value)
