"""DEPRECATED, to be removed: the old names of the argument checks, re-exported.

The one vocabulary lives in `landscape._validate` (tracer-tolerant, each check returns
the value unchanged). Nothing in Basin imports this module any more; it stays only
until every branch being merged has switched.
"""

from landscape._validate import (  # noqa: F401  (re-exported)
    boolean,
    fraction,
    integer,
    nonnegative,
    optional,
    positive,
    positive_int,
    schedule_or,
    unit_interval,
)
from landscape._validate import one_of as choice  # noqa: F401  (the old curried form)

__all__ = ["boolean", "choice", "fraction", "integer", "nonnegative", "optional", "positive",
           "positive_int", "schedule_or", "unit_interval"]
