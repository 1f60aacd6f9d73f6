"""A short curvature tour of an MLP trained on MNIST-1D (what `make demo` runs for now).

Trains the 40→256→256→10 MLP with Adam for a few hundred steps, then measures the
Hessian of the training loss over all 4 000 training examples: top eigenvalues
(Lanczos), trace (Hutch++), the spectral density (stochastic Lanczos quadrature) and
the top Gauss-Newton eigenvalue, and writes the density to a PNG.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import landscape as ls
from landscape import plot
from experiments.data import mnist1d
from experiments.loop import fit
from experiments.models import MLP, pure


def _train(apply_fn, loss_fn, params, data, steps: int, key):
    """Adam on mini-batches of 128 in exact epochs; returns (params, train acc, test acc)."""
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    t0 = time.perf_counter()
    params, _, losses, _ = fit(loss_fn, params, optax.adam(1e-3), (x, y), steps=steps,
                               batch_size=128, key=key, scan=True)
    train_acc = float(ls.accuracy(apply_fn(params, x), y))
    test_acc = float(ls.accuracy(apply_fn(params, jnp.asarray(data.x_test)),
                                 jnp.asarray(data.y_test)))
    print(f"trained {steps} Adam steps in {time.perf_counter() - t0:.1f}s: "
          f"train loss {float(losses[-1]):.3f}, train acc {train_acc:.3f}, "
          f"test acc {test_acc:.3f}")
    return params, train_acc, test_acc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="output directory")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    data = mnist1d()
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    key = jax.random.key(args.seed)
    apply_fn, params = pure(MLP((40, 256, 256, 10), rngs=nnx.Rngs(args.seed)))

    def loss_fn(p, batch):
        return ls.cross_entropy(apply_fn(p, batch[0]), batch[1])

    params, train_acc, test_acc = _train(apply_fn, loss_fn, params, data, args.steps, key)

    H = ls.hessian(loss_fn, params, (x, y), chunk_size=1000)
    G = ls.ggn(apply_fn, params, (x, y), chunk_size=1000)
    t0 = time.perf_counter()
    eig = ls.eigenvalues(H, k=5, key=key, which="top")
    bottom = ls.eigenvalues(H, k=1, key=key, which="bottom")
    tr = ls.trace(H, key=key, num_probes=60)
    den = ls.density(H, key=key, num_probes=4, num_steps=60)
    g_top = ls.eigenvalues(G, k=1, key=key)
    elapsed = time.perf_counter() - t0

    summary = {
        "num_params": H.size, "num_examples": int(x.shape[0]),
        "train_loss": float(H.value()), "train_accuracy": train_acc,
        "test_accuracy": test_acc,
        "hessian_top5": [float(v) for v in eig.values],
        "hessian_top5_residuals": [float(r) for r in eig.residuals],
        "hessian_min": float(bottom.values[0]),
        "hessian_trace": float(tr.value), "hessian_trace_std_error": float(tr.std_error),
        "ggn_max": float(g_top.values[0]), "seconds_measuring": elapsed,
    }
    (out / "curvature.json").write_text(json.dumps(summary, indent=2))
    print(f"Hessian over {x.shape[0]} examples ({H.size} parameters), {elapsed:.1f}s:")
    print("  top-5 eigenvalues " + ", ".join(f"{v:.4g}" for v in eig.values))
    print(f"  smallest eigenvalue {summary['hessian_min']:.4g}; "
          f"trace {summary['hessian_trace']:.4g} ± {summary['hessian_trace_std_error']:.2g}")
    print(f"  Gauss-Newton top eigenvalue {summary['ggn_max']:.4g}")

    fig = plot.density(den, title="Hessian spectral density, MLP on MNIST-1D")
    fig.savefig(out / "hessian_density.png", dpi=120, bbox_inches="tight")
    print(f"wrote {out / 'curvature.json'} and {out / 'hessian_density.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
