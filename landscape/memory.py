"""Memory of compiled computations, and chunk sizes that keep an operator in a budget.

XLA reports, for a compiled function, the bytes of its arguments, its outputs and the
temporary buffers it needs at once (`Compiled.memory_analysis()`, available on CPU and
GPU). Curvature operators average over fixed-size chunks of the data
(`chunk_size`), so the temporaries of a matvec grow with the chunk, not with the
dataset: `chunk_size_for_budget` compiles the matvec at candidate chunk sizes and
returns the largest that fits the user's budget.

What the GGN and Fisher matvecs never form: a (batch × classes × classes) output
Hessian. For cross-entropy the product with diag(p) − p pᵀ is computed as
p ⊙ u − p (pᵀu), so their temporaries are those of one forward-mode and one
reverse-mode pass (see benchmarks/bench_memory.py for the numbers).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from landscape import _validate, spectrum
from landscape._bytes import default_budget, device_bytes, tree_bytes

__all__ = ["ChunkChoice", "DeviceMemory", "MemoryEstimate", "chunk_size_for_budget",
           "default_budget", "device_bytes", "device_memory", "matvec_memory",
           "memory_estimate", "tree_bytes"]


class MemoryEstimate(NamedTuple):
    """XLA's memory analysis of one compiled call, in bytes.

    `total` = arguments + outputs + temporaries − aliased (outputs written in place of
    arguments): what the call holds at its peak, inputs included.
    """

    argument: int
    output: int
    temp: int
    alias: int
    total: int


class ChunkChoice(NamedTuple):
    """`chunk_size` (None: the whole batch at once) and its `estimate`; `tried` lists
    `(chunk_size, total bytes)` for every size compiled on the way."""

    chunk_size: int | None
    estimate: MemoryEstimate
    tried: tuple


def memory_estimate(fn: Callable[..., Any], *args: Any) -> MemoryEstimate:
    """The memory `jax.jit(fn)(*args)` needs, from XLA's analysis of the compiled call.

    Nothing is run: the function is lowered and compiled only (args may be
    `jax.ShapeDtypeStruct`s).

    Example:
      >>> est = ls.memory.memory_estimate(jax.grad(loss_fn), params, batch)
      >>> est.temp / 2**20   # MiB of temporaries
    """
    if not callable(fn):
        raise ValueError(f"`fn` must be callable; got {type(fn).__name__}.")
    return _estimate(jax.jit(fn).lower(*args).compile())


def _estimate(compiled: Any) -> MemoryEstimate:
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise ValueError("this backend gives no memory analysis for compiled functions.")
    argument = int(analysis.argument_size_in_bytes)
    output = int(analysis.output_size_in_bytes)
    temp = int(analysis.temp_size_in_bytes)
    alias = int(analysis.alias_size_in_bytes)
    return MemoryEstimate(argument, output, temp, alias, argument + output + temp - alias)


def _check_operator(op: Any) -> None:
    if not hasattr(op, "matvec") or not hasattr(op, "params"):
        raise ValueError("`op` must be a landscape operator (with `matvec` and `params`); "
                         f"got {type(op).__name__}.")


def _product(o, w):
    return o.matvec(w)


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs like `tree`, keeping each leaf's sharding."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        np.shape(x), x.dtype, sharding=getattr(x, "sharding", None)), tree)


def matvec_memory(op: Any) -> MemoryEstimate:
    """`memory_estimate` of `op.matvec(v)` for any operator of `landscape` (v like params).

    Example:
      >>> ls.memory.matvec_memory(ls.ggn(apply_fn, params, data, chunk_size=256)).total
    """
    _check_operator(op)
    return memory_estimate(_product, op, _abstract(op.params))


class DeviceMemory(NamedTuple):
    """Per-device bytes of an operator's programs (`device_memory`).

    matvec: XLA's analysis of one compiled product (per device for a partitioned
      program: arguments, i.e. the device's shards of params and data, + temporaries).
    eigenvalues: the program `ls.eigenvalues` runs with the same arguments (the
      adaptive loop or the fixed-step scan, its basis, start vector, repeat checks and
      residuals): what the call holds at its peak.
    basis: bytes of that program's Lanczos basis (`rows` rows) held by one device.
    params: bytes of the parameters held by one device; `params_total`: all of them.
    """

    matvec: MemoryEstimate
    eigenvalues: MemoryEstimate
    basis: int
    rows: int
    params: int
    params_total: int


def device_memory(op: Any, k: int = 1, *, which: str = "top", tol: float | None = None,
                  num_steps: int | None = None, max_steps: int | None = None,
                  check: bool | None = None, mode: str = "auto",
                  budget: int | None = None) -> DeviceMemory:
    """Per-device memory of `op`'s product and of the `ls.eigenvalues` call with these
    arguments, from the compiled programs (nothing runs).

    The arguments are `eigenvalues`' own, and the program compiled is the one that call
    runs (so a later call with them reuses the compilation). For an operator whose
    parameters are sharded (`ls.shard(op, mesh=...)`) XLA's analysis is of the
    partitioned program, i.e. one device's share. The basis has `max_steps` rows
    (default `max(3w, w + 30)` for `w` wanted values: 31 for λ_max, 33 for the top 3),
    or `num_steps` for a fixed-step run: lower `max_steps` to fit a budget.

    Example:
      >>> mesh = jax.make_mesh((2, 4), ("data", "model"))
      >>> H = ls.shard(ls.hessian(loss_fn, params, batch, chunk_size=8), mesh=mesh)
      >>> mem = ls.memory.device_memory(H, k=3)
      >>> mem.eigenvalues.total / 2**30, mem.basis / 2**30      # GiB per device
    """
    _check_operator(op)
    program = spectrum._program(op, k, jax.random.key(0), which, tol, num_steps,
                                max_steps, check, None, "lanczos", 1, mode, budget)
    eigen = _estimate(program.fn.lower(*program.args, **program.static).compile())
    per_row = device_bytes(op.params)
    return DeviceMemory(matvec_memory(op), eigen, program.rows * per_row, program.rows,
                        per_row, tree_bytes(op.params))


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def chunk_size_for_budget(build: Callable[[int | None], Any], budget_bytes: int, *,
                          num_examples: int, candidates: Any = None,
                          data_devices: int = 1) -> ChunkChoice:
    """The largest chunk size whose matvec fits in `budget_bytes`, by compiling.

    `build(chunk_size)` returns an operator (e.g. `lambda c: ls.ggn(apply_fn, params,
    data, chunk_size=c)`); its matvec is compiled at candidate sizes (binary search,
    assuming memory grows with the chunk) and measured with `matvec_memory`. The budget
    counts everything the call holds (`MemoryEstimate.total`): data and parameters as
    well as temporaries, so it must exceed the data's own size.

    On a mesh: let `build` return the sharded operator (`ls.shard(op, mesh=...)`); the
    compiled program is then the partitioned one and `budget_bytes` is per device. Pass
    `data_devices` (the size of the mesh's data axis) so the default candidates are
    chunks that split evenly over it (multiples of it that divide `num_examples`).

    Args:
      build: `build(chunk_size) -> operator`; `chunk_size=None` means no chunking.
      budget_bytes: the most bytes one matvec may hold (> 0).
      num_examples: examples in the operator's batch.
      candidates: chunk sizes to choose from; by default the divisors of
        `num_examples` (equal chunks, no remainder to compile separately).

    Returns:
      `ChunkChoice(chunk_size, estimate, tried)`; `chunk_size` is None when the whole
      batch fits at once.

    Raises:
      ValueError: if even the smallest candidate does not fit (says what it needs).

    Example:
      >>> choice = ls.memory.chunk_size_for_budget(
      ...     lambda c: ls.ggn(apply_fn, params, data, chunk_size=c), 2 * 2**30,
      ...     num_examples=len(data[1]))
      >>> G = ls.ggn(apply_fn, params, data, chunk_size=choice.chunk_size)
    """
    if not callable(build):
        raise ValueError(f"`build` must be callable; got {type(build).__name__}.")
    n = _validate.positive_int(num_examples, "num_examples")
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, float)) \
            or not budget_bytes > 0:
        raise ValueError(f"`budget_bytes` must be a positive number; got {budget_bytes!r}.")
    data_devices = _validate.positive_int(data_devices, "data_devices")
    if candidates is None:
        sizes = [c for c in _divisors(n) if c % data_devices == 0] or [n]
    else:
        sizes = sorted({int(_validate.positive_int(c, "candidates[i]")) for c in candidates})
        if not sizes or sizes[-1] > n:
            raise ValueError("`candidates` must be a non-empty list of chunk sizes up to "
                             f"num_examples ({n}); got {candidates!r}.")
    tried = {}

    def measure(i):
        size = None if sizes[i] == n else sizes[i]
        if i not in tried:
            tried[i] = matvec_memory(build(size))
        return tried[i]

    lo, hi = 0, len(sizes) - 1
    if measure(lo).total > budget_bytes:
        raise ValueError(f"`budget_bytes` ({int(budget_bytes)}) is too small: the smallest "
                         f"chunk ({sizes[0]}) needs {measure(lo).total} bytes "
                         f"({measure(lo).argument} of them arguments: data and params).")
    while lo < hi:  # invariant: sizes[lo] fits
        mid = (lo + hi + 1) // 2
        if measure(mid).total <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return ChunkChoice(None if sizes[lo] == n else sizes[lo], tried[lo],
                       tuple((sizes[i], tried[i].total) for i in sorted(tried)))
