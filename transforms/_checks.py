"""Hyper-parameter checks shared by `make` and the transforms' constructors.

Each check is `check(value, name) -> value` and raises ValueError naming `name` and what
was expected. Values may be Python numbers, 0-d arrays or tracers (a transform built
inside `jax.vmap` over a learning rate, or by `optax.inject_hyperparams`); range checks
run only on concrete values.
"""

from __future__ import annotations

import math

import jax
import numpy as np


def _scalar(value, name, test, expected):
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.")
    if isinstance(value, jax.core.Tracer):
        if value.shape != ():
            raise ValueError(f"`{name}` must be a scalar ({expected}); got an array of "
                             f"shape {value.shape}.")
        return value
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything non-numeric gets the same message
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.") from None
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"`{name}` must be a scalar ({expected}); got {value!r}.")
    if not math.isfinite(float(arr)) or not test(float(arr)):
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.")
    return value


def positive(value, name):
    return _scalar(value, name, lambda v: v > 0, "a number > 0")


def nonnegative(value, name):
    return _scalar(value, name, lambda v: v >= 0, "a number >= 0")


def unit_interval(value, name):
    return _scalar(value, name, lambda v: 0 <= v < 1, "a number in [0, 1)")


def positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def boolean(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")
    return bool(value)


def choice(*options):
    def check(value, name):
        if value not in options:
            raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}; "
                             f"got {value!r}.")
        return value
    return check


def optional(check):
    return lambda value, name: None if value is None else check(value, name)


def schedule_or(check):
    """Accept a schedule (a callable of the step count) or a value passing `check`."""
    return lambda value, name: value if callable(value) else check(value, name)


def fraction(value, name):
    return _scalar(value, name, lambda v: 0 < v <= 1, "a number in (0, 1]")


def integer(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer; got {value!r}.")
    return int(value)
