"""Input checks shared by the public functions of `landscape`.

Every check runs on static information (tree structure, shapes, dtypes) so it works
under `jax.jit`; value checks (ranges, `check_finite`) are skipped when values are
traced. `transforms` uses the same checks (imports flow transforms -> landscape).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def num_examples(batch: Any, name: str = "batch") -> int:
    """Leading-axis length shared by every leaf of `batch`."""
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; expected a pytree of arrays "
                         "with a shared leading example axis.")
    sizes = {np.shape(x)[0] if np.ndim(x) > 0 else None for x in leaves}
    if None in sizes:
        raise ValueError(f"`{name}` has a scalar leaf; every leaf needs a leading "
                         "example axis.")
    if len(sizes) != 1:
        raise ValueError(f"The leaves of `{name}` disagree on the leading example axis: "
                         f"sizes {sorted(sizes)}.")
    n = sizes.pop()
    if n == 0:
        raise ValueError(f"`{name}` holds 0 examples.")
    return n


def same_structure(v: Any, like: Any, name: str = "v", like_name: str = "params") -> None:
    """Raise ValueError unless `v` has the tree structure and leaf shapes of `like`."""
    sv, sl = jax.tree.structure(v), jax.tree.structure(like)
    if sv != sl:
        raise ValueError(f"`{name}` must have the tree structure of `{like_name}`.\n"
                         f"  {name}: {sv}\n  {like_name}: {sl}")
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(like)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"A leaf of `{name}` has shape {np.shape(a)} where "
                             f"`{like_name}` has {np.shape(b)}.")


# ------------------------------------------------------- argument checks ---
#
# One vocabulary for every package: `check(value, name) -> value`, raising ValueError
# that names the argument and what was expected. Numeric checks accept Python numbers,
# 0-d arrays and tracers (a hyper-parameter swept by `jax.vmap`, or set by
# `optax.inject_hyperparams`); a tracer gets its shape and dtype checked and its range
# skipped. The value comes back as given: a check never converts it (no `float()`), so
# a traced hyper-parameter stays traced.


def _is_tracer(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


def _scalar(value: Any, name: str, test: Callable[[float], bool], expected: str) -> Any:
    if isinstance(value, (bool, np.bool_, str)):
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.")
    if _is_tracer(value):
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.number):
            raise ValueError(f"`{name}` must be a scalar ({expected}); got a traced "
                             f"array of shape {value.shape} and dtype {value.dtype}.")
        return value
    try:
        arr = np.asarray(value)
    except Exception:  # noqa: BLE001 - anything non-numeric gets the same message
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.") from None
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number) \
            or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"`{name}` must be a scalar ({expected}); got {value!r}.")
    x = arr.item()
    if not math.isfinite(x) or not test(x):
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.")
    return value


def number(value: Any, name: str) -> Any:
    """A finite real scalar."""
    return _scalar(value, name, lambda v: True, "a finite number")


def positive(value: Any, name: str) -> Any:
    """A finite scalar > 0."""
    return _scalar(value, name, lambda v: v > 0, "a number > 0")


def nonnegative(value: Any, name: str) -> Any:
    """A finite scalar >= 0."""
    return _scalar(value, name, lambda v: v >= 0, "a number >= 0")


def unit_interval(value: Any, name: str) -> Any:
    """A scalar in [0, 1): a decay rate, a momentum coefficient."""
    return _scalar(value, name, lambda v: 0 <= v < 1, "a number in [0, 1)")


def closed_unit_interval(value: Any, name: str) -> Any:
    """A scalar in [0, 1] (a decay rate where 1 means "no decay": a plain sum)."""
    return _scalar(value, name, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def fraction(value: Any, name: str) -> Any:
    """A scalar in (0, 1]."""
    return _scalar(value, name, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _static_int(value: Any, name: str, test: Callable[[int], bool], expected: str) -> int:
    # Integers set shapes, periods and loop lengths: they must be static Python values.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not test(int(value)):
        raise ValueError(f"`{name}` must be {expected}; got {value!r}.")
    return int(value)


def integer(value: Any, name: str) -> int:
    """A Python integer (static)."""
    return _static_int(value, name, lambda v: True, "an integer")


def positive_int(value: Any, name: str) -> int:
    """A Python integer >= 1 (static)."""
    return _static_int(value, name, lambda v: v >= 1, "a positive integer")


def nonnegative_int(value: Any, name: str) -> int:
    """A Python integer >= 0 (static)."""
    return _static_int(value, name, lambda v: v >= 0, "a non-negative integer")


def boolean(value: Any, name: str) -> bool:
    """True or False (static)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"`{name}` must be True or False; got {value!r}.")
    return bool(value)


def choice(value: Any, name: str, options: tuple) -> Any:
    """One of `options` (static)."""
    if isinstance(value, (list, dict, set)) or value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}; "
                         f"got {value!r}.")
    return value


# Combinators: they build a `check(value, name)` for tables of checks (the registry).

def one_of(*options: Any) -> Callable[[Any, str], Any]:
    """`check(value, name)` accepting exactly `options`."""
    return lambda value, name: choice(value, name, options)


def optional(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """`check`, or None."""
    return lambda value, name: None if value is None else check(value, name)


def schedule_or(check: Callable[[Any, str], Any]) -> Callable[[Any, str], Any]:
    """A schedule (a callable of the step count) or a value passing `check`."""
    return lambda value, name: value if callable(value) else check(value, name)


def is_concrete(*trees: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


def check_finite(what: str, *trees: Any) -> None:
    """Raise ValueError if any leaf holds NaN or inf (only outside of tracing)."""
    if not is_concrete(*trees):
        return
    for x in jax.tree.leaves(trees):
        x = np.asarray(x)  # numpy: jnp operations would be staged inside a trace
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            raise ValueError(f"{what} produced non-finite values (NaN or inf): check "
                             "that the loss is finite at these parameters and this batch.")
