"""Critical-point finder: how far each method drives ‖∇L‖ down on the same HVP budget.

The saddles study's MLP (40-10-10 tanh, square loss + L2, 256 MNIST-1D examples), four
starts along its gradient-descent trajectory. Each method gets the same number of
Hessian-vector products: Levenberg-Marquardt (`gauss_newton`) spends 2·cg_steps + 1 per
step, GD and Adam on ½‖∇L‖² one. Reported: the median final gradient norm over the starts
and the wall-clock time of the whole search (one compiled program per method).
"""

from __future__ import annotations

import time

import jax
import numpy as np

import landscape as ls
from benchmarks._results import machine, write_section
import experiments
from experiments.studies import saddles as sd

HVPS = 2480  # = 40 Levenberg-Marquardt steps of 30 CG iterations (62 HVPs each)


def main() -> None:
    cfg = experiments.load("saddles", ["checkpoints=4", "perturbations=0"])
    batch = sd.data(cfg)
    loss_fn = sd.make_loss(cfg["weight_decay"])
    points, _ = sd.starts(cfg, loss_fn, batch)
    stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs), *points)
    runs = {"gauss_newton (40 steps x 30 CG)": dict(method="gauss_newton", steps=40,
                                                     cg_steps=30),
            "adam on ½‖g‖² (lr 1e-3)": dict(method="adam", steps=HVPS, learning_rate=1e-3),
            "gd on ½‖g‖² (lr 0.05)": dict(method="gd", steps=HVPS, learning_rate=0.05)}
    rows = []
    for name, kw in runs.items():
        fn = lambda: ls.critical_points(loss_fn, stacked, batch, tol=1e-12, index="none",
                                        **kw)
        jax.block_until_ready(fn())  # compile
        t0 = time.perf_counter()
        cp = jax.block_until_ready(fn())
        seconds = time.perf_counter() - t0
        rows.append(f"| {name} | {np.median(np.asarray(cp.grad_norm)):.2e} | "
                    f"{np.max(np.asarray(cp.grad_norm)):.2e} | {seconds:.1f} |")
        print(rows[-1], flush=True)
    md = "\n".join([
        "## Critical-point search: Levenberg-Marquardt, Adam, GD (`bench_critical`)", "",
        f"Machine: {machine()}", "",
        f"Four starts on the saddles study's MLP, {HVPS} Hessian-vector products each "
        "(start ‖∇L‖ from 3.1 at initialization to 0.03 late in training).", "",
        "| method | median final ‖∇L‖ | worst | seconds (4 starts) |", "|---|---|---|---|",
        *rows])
    write_section("bench_critical", md)


if __name__ == "__main__":
    main()
