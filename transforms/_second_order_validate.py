"""DEPRECATED, to be removed: the old names of Shampoo's and SOAP's argument checks.

The one vocabulary lives in `landscape._validate`; these names map onto it so that
`shampoo.py` and `soap.py` keep importing until they switch (then delete this file):

    check.decay(v, n)                 -> _validate.unit_interval(v, n)
    check.decay(v, n, allow_one=True) -> _validate.closed_unit_interval(v, n)
    check.non_negative(v, n)          -> _validate.nonnegative(v, n)
    check.non_negative_int(v, n)      -> _validate.nonnegative_int(v, n)
    check.positive, positive_int, choice: same names in `landscape._validate`.

Unlike the old checks these accept traced values and return the value unchanged
(no `float()`).
"""

from __future__ import annotations

from typing import Any

from landscape._validate import (  # noqa: F401  (re-exported)
    choice,
    closed_unit_interval,
    nonnegative as non_negative,
    nonnegative_int as non_negative_int,
    positive,
    positive_int,
    unit_interval,
)

__all__ = ["choice", "decay", "non_negative", "non_negative_int", "positive", "positive_int"]


def decay(value: Any, name: str, allow_one: bool = False) -> Any:
    return (closed_unit_interval if allow_one else unit_interval)(value, name)
