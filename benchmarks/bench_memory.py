"""Matvec time and memory against a gradient: MLP, BatchNorm CNN, transformer (CPU).

For each model of the zoo at its default size on MNIST-1D (MLP 40→256→256→10, the
1-D CNN with BatchNorm in train mode, the transformer), over N = 512 and 4 000
examples at once (no chunking), at initialization, float32:

- time of one gradient of the mean loss, one Hessian-vector product (`ls.hessian`,
  forward-over-reverse; and reverse-over-forward written plainly, for comparison) and
  one GGN-vector product (`ls.ggn`), each jitted; rounds alternate them and a ratio
  is the median over rounds of the per-round ratio, so that load on the machine
  affects both sides alike;
- memory from XLA's compiled analysis (`ls.memory.memory_estimate`): temporaries of
  each call (the arguments, data and parameters, are the same for the three).

Then the GGN with 1 000 classes against a gradient and against the size of the
(batch × classes × classes) output Hessians it never forms, and
`ls.memory.chunk_size_for_budget` on the transformer over 4 000 examples.

Run: `.venv/bin/python -m benchmarks.bench_memory`.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import landscape as ls
from benchmarks._results import machine, write_section
from experiments.data import mnist1d
from experiments.models import MLP, CNN1D, Transformer1D, pure

SIZES = (512, 4000)
ROUNDS = 5
GOAL = 2.5
MiB = 2 ** 20


def _models():
    return {
        "MLP 40→256→256→10": pure(MLP((40, 256, 256, 10), rngs=nnx.Rngs(0))),
        "CNN1D + BatchNorm (train mode)": pure(CNN1D(10, batch_norm=True,
                                                     rngs=nnx.Rngs(0)), "train"),
        "Transformer1D (dim 128, depth 2)": pure(Transformer1D(10, rngs=nnx.Rngs(0))),
    }


def _functions(apply_fn):
    def loss_fn(p, b):
        return ls.cross_entropy(apply_fn(p, b[0]), b[1])

    grad = jax.jit(jax.grad(loss_fn))
    hvp = jax.jit(lambda p, b, v: ls.hessian(loss_fn, p, b).matvec(v))
    ggn = jax.jit(lambda p, b, v: ls.ggn(apply_fn, p, b).matvec(v))
    # The other order of differentiation, written plainly, for comparison.
    hvp_rf = jax.jit(lambda p, b, v: jax.grad(
        lambda q: jax.jvp(lambda r: loss_fn(r, b), (q,), (v,))[1])(p))
    return loss_fn, grad, hvp, ggn, hvp_rf


def _block(x):
    return jax.block_until_ready(x)


def _rounds(calls: dict, rounds: int = ROUNDS) -> dict:
    """Median seconds of each call and median per-round ratio to the first."""
    for f in calls.values():
        _block(f())
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t0 = time.perf_counter()
            _block(f())
            times[k].append(time.perf_counter() - t0)
    first = next(iter(calls))
    return {k: (statistics.median(v),
                statistics.median(a / b for a, b in zip(v, times[first])))
            for k, v in times.items()}


def _temp(fn, *args) -> int:
    return ls.memory.memory_estimate(fn, *args).temp


def main() -> None:
    data = mnist1d()
    x_all = jnp.asarray(data.x_train, jnp.float32)
    y_all = jnp.asarray(data.y_train)
    rows, verdict = [], {}
    for name, (apply_fn, params) in _models().items():
        size = sum(a.size for a in jax.tree.leaves(params))
        _, grad, hvp, ggn, hvp_rf = _functions(apply_fn)
        v = jax.tree.map(lambda a: jax.random.normal(jax.random.key(1), a.shape), params)
        for n in SIZES:
            batch = (x_all[:n], y_all[:n])
            t = _rounds({"grad": lambda: grad(params, batch),
                         "hvp": lambda: hvp(params, batch, v),
                         "ggn": lambda: ggn(params, batch, v),
                         "rf": lambda: hvp_rf(params, batch, v)})
            g_temp = _temp(grad, params, batch)
            h_temp = _temp(hvp, params, batch, v)
            n_temp = _temp(ggn, params, batch, v)
            verdict[name] = max(verdict.get(name, 0.0), t["hvp"][1])
            rows.append(
                f"| {name} | {size:,} | {n} | {1e3 * t['grad'][0]:.2f} | "
                f"{1e3 * t['hvp'][0]:.2f} | {1e3 * t['ggn'][0]:.2f} | "
                f"**{t['hvp'][1]:.2f}** | {t['rf'][1]:.2f} | {t['ggn'][1]:.2f} | "
                f"{g_temp / MiB:.1f} | "
                f"{h_temp / g_temp:.2f} | {n_temp / g_temp:.2f} |")
            print(rows[-1], flush=True)

    # The GGN with 1 000 classes: never a (batch × classes × classes) tensor.
    wide_fn, wide = pure(MLP((40, 256, 256, 1000), rngs=nnx.Rngs(0)))
    _, grad, _, ggn, _ = _functions(wide_fn)
    n = 512
    batch = (x_all[:n], y_all[:n])
    g_est = ls.memory.memory_estimate(grad, wide, batch)
    n_est = ls.memory.memory_estimate(ggn, wide, batch, wide)
    full = n * 1000 * 1000 * 4

    # A budget for the transformer over all 4 000 examples.
    t_fn, t_params = pure(Transformer1D(10, rngs=nnx.Rngs(0)))
    data4k = (x_all, y_all)
    whole = ls.memory.matvec_memory(ls.ggn(t_fn, t_params, data4k))
    budget = whole.argument + (whole.total - whole.argument) // 8
    t0 = time.perf_counter()
    choice = ls.memory.chunk_size_for_budget(
        lambda c: ls.ggn(t_fn, t_params, data4k, chunk_size=c), budget, num_examples=4000)
    search = time.perf_counter() - t0

    met = ", ".join(f"{k}: {'met' if r <= GOAL else 'NOT met'} (worst {r:.2f})"
                    for k, r in verdict.items())
    md = "\n".join([
        "## Matvec time and memory relative to a gradient (`bench_memory`)",
        "",
        f"Machine: {machine()}. Shared with other jobs while measured: absolute times are",
        "noisy; ratios are medians of per-round ratios (gradient, HVPs and GGN matvec",
        f"timed in turn, {ROUNDS} rounds). Default-size models at initialization, float32,",
        "all N examples in one batch (no chunks). Memory: temporaries from XLA's compiled",
        "memory analysis (`ls.memory.memory_estimate`); arguments are the same for all three.",
        "",
        "| model | params | N | grad ms | HVP ms | GGN-vp ms | HVP / grad |"
        " rev-over-fwd HVP / grad | GGN / grad | grad temp MiB | HVP temp / grad |"
        " GGN temp / grad |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"Goal HVP / gradient ≤ {GOAL} (`ls.hessian`, forward-over-reverse): {met}. The "
        "column 'rev-over-fwd' is `jax.grad` of `jax.jvp` of the loss, written plainly "
        "here for comparison (not what `ls.hessian` uses).",
        "",
        f"GGN with 1 000 classes (MLP 40→256→256→1000, N = {n}): gradient temporaries "
        f"{g_est.temp / MiB:.1f} MiB, GGN-vector product temporaries "
        f"{n_est.temp / MiB:.1f} MiB, against {full / MiB:,.0f} MiB for the "
        "(batch × classes × classes) output Hessians it does not form.",
        "",
        f"`ls.memory.chunk_size_for_budget` on the transformer's GGN over 4 000 examples, "
        f"budget = arguments + 1/8 of the unchunked temporaries ({budget / MiB:.1f} MiB; "
        f"unchunked total {whole.total / MiB:.1f} MiB): chunk size {choice.chunk_size}, "
        f"total {choice.estimate.total / MiB:.1f} MiB, after compiling "
        f"{len(choice.tried)} sizes in {search:.1f} s.",
    ])
    write_section("bench_memory", md)
    print(md)


if __name__ == "__main__":
    main()
