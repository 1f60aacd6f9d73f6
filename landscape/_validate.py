"""Input checks shared by the public functions of `landscape`.

Every check runs on static information (tree structure, shapes, dtypes) so it works
under `jax.jit`; value checks (`check_finite`) are skipped when values are traced.
"""

from __future__ import annotations

from typing import Any

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


def positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return int(value)


def choice(value: Any, name: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, options))}; "
                         f"got {value!r}.")
    return value


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
