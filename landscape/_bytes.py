"""Bytes of pytrees and the default memory budget: what operators and estimators size
their stored residuals and probe blocks by (re-exported by `landscape.memory`, which
compiles the programs themselves)."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np


def tree_bytes(tree: Any) -> int:
    """Bytes of a pytree's array leaves (arrays or `jax.ShapeDtypeStruct`s).

    Example:
      >>> ls.memory.tree_bytes(jax.eval_shape(lambda p: jax.linearize(f, p)[1], params))
    """
    return sum(int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def device_bytes(tree: Any) -> int:
    """Bytes of a pytree's arrays held by one device: each leaf's shard (its full size
    when it is not split, e.g. replicated or on one device)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = np.shape(x)
        sharding = getattr(x, "sharding", None)
        if sharding is not None and hasattr(sharding, "shard_shape"):
            shape = sharding.shard_shape(shape)
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def default_budget(fraction: float = 0.25, device: Any = None) -> int:
    """`fraction` of a device's memory, in bytes: what Basin lets stored residuals take
    by default (`ls.prepared`, probe blocks of `ls.trace` and `ls.diagonal`).

    An accelerator reports its limit (`memory_stats()["bytes_limit"]`); a CPU device
    reports none, and the machine's physical memory stands in.

    Example:
      >>> ls.memory.default_budget() / 2**30   # GiB
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1]; got {fraction!r}.")
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    total = (stats or {}).get("bytes_limit")
    if not total:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(fraction * total)
