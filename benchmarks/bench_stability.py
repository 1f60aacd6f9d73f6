"""How many examples give a stable curvature estimate: λ_max and trace of the reference
MLP over 128, 512, 2 000 and 4 000 examples, 10 seeds each.

The reference MLP (`benchmarks._reference_mlp`: 40→256→256→10, briefly trained with
SGD) is fixed; each seed draws a subset of the 4 000 MNIST-1D training examples
without replacement and the random start / probes of the estimators, so the spread
across seeds mixes sampling of the data with the estimators' own noise (at 4 000 the
subset is the whole training set and only the estimator noise is left). λ_max: 20
Lanczos steps (residual flag at tol 1e-3); trace: Hutch++ with 60 probes.

Run: `.venv/bin/python -m benchmarks.bench_stability`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import landscape as ls
from benchmarks import _reference_mlp as ref
from benchmarks._results import machine, write_section

SIZES = (128, 512, 2000, 4000)
SEEDS = 10
STEPS, PROBES, CHUNK = 20, 60, 1000


def measure(params, x, y, n, seed):
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], n, replace=False))
    H = ls.hessian(ref.loss_fn, params, (jnp.asarray(x[idx]), jnp.asarray(y[idx])),
                   chunk_size=min(n, CHUNK))
    key = jax.random.key(seed)
    eig = ls.eigenvalues(H, 1, key=key, num_steps=STEPS)
    tr = ls.trace(H, key=jax.random.fold_in(key, 1), num_probes=PROBES)
    return (float(eig.values[0]), bool(eig.converged[0]), float(tr.value),
            float(tr.std_error))


def main() -> None:
    x, y = ref.data()
    params, loss = ref.trained(x, y)
    results = {n: [measure(params, x, y, n, s) for s in range(SEEDS)] for n in SIZES}
    rows = ["| examples | λ_max mean ± sd (min–max) | λ_max sd/mean | converged | "
            "trace mean ± sd (min–max) | trace sd/mean | mean probe std error |",
            "|---|---|---|---|---|---|---|"]
    for n, res in results.items():
        lam, conv, tr, err = (np.array(c) for c in zip(*res))
        rows.append(
            f"| {n} | {lam.mean():.3f} ± {lam.std(ddof=1):.3f} ({lam.min():.3f}–"
            f"{lam.max():.3f}) | {lam.std(ddof=1) / lam.mean():.1%} | {conv.sum()}/{SEEDS} "
            f"| {tr.mean():.2f} ± {tr.std(ddof=1):.2f} ({tr.min():.2f}–{tr.max():.2f}) | "
            f"{tr.std(ddof=1) / tr.mean():.1%} | {err.mean():.2f} |")
    md = "\n".join([
        "## Stability of curvature estimates across subsets (`bench_stability`)", "",
        f"Machine: {machine()}.", "",
        f"Reference MLP 40→256→256→10 (78 858 parameters, float32) after "
        f"{ref.TRAIN_STEPS} SGD steps (lr {ref.LEARNING_RATE}, minibatch "
        f"{ref.MINIBATCH}, seed 0; training loss {loss:.3f} on the 4 000 examples). "
        f"{SEEDS} seeds per size; a seed picks the subset (without replacement) and the "
        f"estimators' randomness. λ_max from {STEPS} Lanczos steps; trace from "
        f"{PROBES}-probe Hutch++; sd is across seeds.", "",
        *rows,
    ])
    write_section("bench_stability", md)
    print(md)


if __name__ == "__main__":
    main()
