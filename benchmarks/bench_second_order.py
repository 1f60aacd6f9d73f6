"""Shampoo, SOAP and K-FAC against Adam: time per step and steps to a training loss.

1. Time per step (gradient + statistics + update, jitted, float32, batch 512) on the
   MLPs 40→256→256→10 and 40→1024→1024→10, measured over a `lax.scan` of one whole
   refresh period (10 steps, one of which refreshes the roots / bases / inverses), so
   the refresh cost is amortized; reported as a ratio to Adam's step.
2. Steps to a training loss of TARGET on MNIST-1D (4 000 examples, mini-batches of
   512, the 256-wide MLP), each optimizer at the best of three learning rates (one
   compiled program per optimizer), loss on the whole training set every 10 steps.

Run: `python -m benchmarks.bench_second_order` (a few minutes on 2 CPU cores);
`--profile` measures only where the 256-wide MLP's step time goes (`profile`, its own
section of RESULTS.md).

OPENBLAS_NUM_THREADS defaults to 1 here (set before jax is imported): jaxlib's CPU
`eigh` and `qr` call scipy's OpenBLAS, whose own threads competed with XLA's for the two
cores and made each decomposition 10-70x slower (a 256 × 256 `eigh` 13 ms on one
thread, 220-330 ms with OpenBLAS's default threads while other jobs ran).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks._results import machine, write_section  # noqa: E402
from transforms.kfac import find_dense_layers, kfac, kfac_statistics  # noqa: E402
from transforms.shampoo import shampoo  # noqa: E402
from transforms.soap import soap  # noqa: E402

PERIOD = 10
BATCH = 512
TARGET = 0.05
MAX_STEPS = 600
EVAL_EVERY = 10


def init_mlp(key, sizes):
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append({"w": jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a),
                       "b": jnp.zeros(b, jnp.float32)})
    return params


def apply_mlp(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply_mlp(params, x), y).mean()


def optimizers(layers, shampoo_start=PERIOD):
    """name -> (make(learning_rate), needs K-FAC statistics, learning-rate grid).

    The timing passes `shampoo_start=0` so that its 10 timed steps include a refresh
    of the roots and use them, as they do for SOAP and K-FAC."""
    return {
        "adam": (lambda lr: optax.adam(lr), False, (3e-3, 1e-2, 3e-2)),
        "shampoo": (lambda lr: shampoo(lr, precondition_every=PERIOD,
                                       start_preconditioning_step=shampoo_start),
                    False, (3e-3, 1e-2, 3e-2)),
        "soap": (lambda lr: soap(lr, b1=0.9, b2=0.999, precondition_every=PERIOD),
                 False, (3e-3, 1e-2, 3e-2)),
        "kfac": (lambda lr: kfac(lr, layers, damping=1e-2, inverse_every=PERIOD,
                                 momentum=0.9), True, (0.01, 0.03, 0.1)),
    }


def make_step(opt, uses_stats, part="step"):
    """A `lax.scan` body over batches. `part` (for `--profile`): "step" the whole step;
    "no_refresh" the step at global steps 1…PERIOD of an optimizer that refreshes at
    step 0 only (its periodic refresh left out); "gradient" the gradient (and K-FAC's
    statistics) alone, summed into the parameters so that nothing is removed."""
    def step(carry, batch):
        params, state, key, t = carry
        key, sub = jax.random.split(key)
        grads = jax.grad(loss_fn)(params, batch)
        extra = ({"statistics": kfac_statistics(apply_mlp, params, batch[0], key=sub)}
                 if uses_stats else {})
        if part == "gradient":
            stats = jax.tree.map(jnp.sum, extra.get("statistics", ()))
            bump = sum(jax.tree.leaves(stats), jnp.zeros([], jnp.float32)) * 1e-30
            new = jax.tree.map(lambda p, g: p - 1e-3 * g + bump, params, grads)
            return (new, state, key, t + 1), None
        if part == "no_refresh":
            extra["step"] = t + 1
        updates, state = opt.update(grads, state, params, **extra)
        return (optax.apply_updates(params, updates), state, key, t + 1), None
    return step


def time_per_step(sizes, rounds=5):
    """Seconds per step of each optimizer: medians over `rounds` interleaved rounds
    (one compiled refresh period per optimizer per round), so that load from other jobs
    hits every optimizer alike."""
    key = jax.random.key(0)
    params = init_mlp(key, sizes)
    x = jax.random.normal(key, (PERIOD, BATCH, sizes[0]), jnp.float32)
    y = jax.random.randint(key, (PERIOD, BATCH), 0, sizes[-1])
    layers = find_dense_layers(apply_mlp, params, x[0])
    runs = {}
    for name, (make, uses_stats, lrs) in optimizers(layers, shampoo_start=0).items():
        opt = make(lrs[1])   # the middle of the grid
        step = make_step(opt, uses_stats)
        run = jax.jit(lambda c, step=step: jax.lax.scan(step, c, (x, y))[0])
        carry = (params, opt.init(params), key, jnp.zeros([], jnp.int32))
        jax.block_until_ready(run(carry))
        runs[name] = (run, carry)
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (run, carry) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(carry))
            times[name].append((time.perf_counter() - t0) / PERIOD)
    out = {name: statistics.median(t) for name, t in times.items()}
    for name, t in out.items():
        print(f"  {'-'.join(map(str, sizes))} {name}: {1e3 * t:.2f} ms/step", flush=True)
    return out


def profile(sizes=(40, 256, 256, 10), rounds=7):
    """Where a step's time goes, per optimizer: the gradient (with K-FAC's statistics),
    the update without its refresh, and the refresh (one per period) amortized.

    Refresh-free runs use `precondition_every` / `inverse_every` of 10⁶ with the global
    step passed as 1…PERIOD, so no step of the timed scan refreshes."""
    key = jax.random.key(0)
    params = init_mlp(key, sizes)
    x = jax.random.normal(key, (PERIOD, BATCH, sizes[0]), jnp.float32)
    y = jax.random.randint(key, (PERIOD, BATCH), 0, sizes[-1])
    layers = find_dense_layers(apply_mlp, params, x[0])
    never = {"shampoo": lambda lr: shampoo(lr, precondition_every=10**6,
                                           start_preconditioning_step=0),
             "soap": lambda lr: soap(lr, b1=0.9, b2=0.999, precondition_every=10**6),
             "kfac": lambda lr: kfac(lr, layers, damping=1e-2, inverse_every=10**6,
                                     momentum=0.9)}
    runs = {}
    for name, (make, uses_stats, lrs) in optimizers(layers, shampoo_start=0).items():
        parts = {"gradient": (make, "gradient"), "step": (make, "step")}
        if name in never:
            parts["no_refresh"] = (never[name], "no_refresh")
        for part, (mk, how) in parts.items():
            opt = mk(lrs[1])
            step = make_step(opt, uses_stats, how)
            run = jax.jit(lambda c, step=step: jax.lax.scan(step, c, (x, y))[0])
            carry = (params, opt.init(params), key, jnp.zeros([], jnp.int32))
            jax.block_until_ready(run(carry))
            runs[name, part] = (run, carry)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, (run, carry) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run(carry))
            times[k].append((time.perf_counter() - t0) / PERIOD)
    t = {k: statistics.median(v) for k, v in times.items()}
    adam = t["adam", "step"]
    lines = [
        "## Where a second-order step's time goes (`bench_second_order --profile`)", "",
        f"Machine: {machine()}; OPENBLAS_NUM_THREADS="
        f"{os.environ.get('OPENBLAS_NUM_THREADS')}; load average {os.getloadavg()[0]:.1f} "
        "when written (other jobs share the cores).", "",
        f"MLP {'-'.join(map(str, sizes))}, batch {BATCH}, float32, default settings "
        f"(refresh every {PERIOD} steps, Shampoo from step 0), ms per step, medians of "
        f"{rounds} interleaved rounds of a compiled {PERIOD}-step scan. *gradient*: the "
        "gradient alone (K-FAC: with its statistics, one more forward and backward pass "
        "and the factors' outer products); *update*: the rest of a step that does not "
        "refresh; *refresh*: the roots / bases / inverses of one refresh, divided by "
        f"{PERIOD}.", "",
        "| optimizer | step | × Adam | gradient (+ statistics) | update | refresh, "
        "amortized |", "|---|---|---|---|---|---|"]
    for name in ("adam", "shampoo", "soap", "kfac"):
        step, grad = t[name, "step"], t[name, "gradient"]
        nr = t.get((name, "no_refresh"), step)
        lines.append(f"| {name} | {1e3 * step:.2f} | {step / adam:.2f}× | {1e3 * grad:.2f} "
                     f"| {1e3 * (nr - grad):.2f} | {1e3 * (step - nr):.2f} |")
    return "\n".join(lines)


def mnist1d_data():
    from mnist1d.data import get_dataset_args, make_dataset
    state = np.random.get_state()   # make_dataset seeds numpy's global generator
    data = make_dataset(get_dataset_args())
    np.random.set_state(state)
    return jnp.asarray(data["x"], jnp.float32), jnp.asarray(data["y"], jnp.int32)


def steps_to_target(x, y):
    sizes = (40, 256, 256, 10)
    params = init_mlp(jax.random.key(1), sizes)
    layers = find_dense_layers(apply_mlp, params, x[:1])
    # a fresh shuffle of the training set per epoch, cut into batches
    rng = np.random.default_rng(0)
    epochs = 1 + MAX_STEPS * BATCH // x.shape[0]
    order = np.concatenate([rng.permutation(x.shape[0]) for _ in range(epochs)])
    idx = jnp.asarray(order[:MAX_STEPS * BATCH].reshape(MAX_STEPS // EVAL_EVERY,
                                                        EVAL_EVERY, BATCH))
    results = {}
    for name, (make, uses_stats, lrs) in optimizers(layers).items():
        def train(lr):
            opt = make(lr)
            step = make_step(opt, uses_stats)

            def chunk(carry, ids):
                carry, _ = jax.lax.scan(step, carry, (x[ids], y[ids]))
                return carry, loss_fn(carry[0], (x, y))

            _, losses = jax.lax.scan(chunk, (params, opt.init(params), jax.random.key(2),
                                             jnp.zeros([], jnp.int32)), idx)
            return losses

        # one compilation per optimizer, the learning rate a traced argument; a loop
        # rather than vmap, which ran pathologically slowly here (see the report)
        t0 = time.perf_counter()
        run = jax.jit(train)
        losses = np.stack([np.asarray(run(jnp.asarray(lr, jnp.float32))) for lr in lrs])
        wall = time.perf_counter() - t0
        steps = [EVAL_EVERY * (int(np.argmax(row <= TARGET)) + 1) if np.any(row <= TARGET)
                 else None for row in losses]
        best = min(range(len(lrs)), key=lambda i: (steps[i] is None, steps[i] or 0,
                                                   losses[i, -1]))
        results[name] = dict(lr=lrs[best], steps=steps[best],
                             final=float(losses[best, -1]), wall=wall)
        print(f"  MNIST-1D {name}: {results[name]}", flush=True)
    return results


def main() -> None:
    if "--profile" in sys.argv[1:]:
        text = profile()
        print(text)
        write_section("bench_second_order_profile", text)
        return
    timings = {"40-256-256-10": time_per_step((40, 256, 256, 10)),
               "40-1024-1024-10": time_per_step((40, 1024, 1024, 10))}
    x, y = mnist1d_data()
    runs = steps_to_target(x, y)

    names = ["adam", "shampoo", "soap", "kfac"]
    lines = [
        "## Second-order optimizers: Shampoo, SOAP, K-FAC (`bench_second_order`)",
        "",
        f"Machine: {machine()}. float32, jitted; medians of 5 interleaved rounds; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; load average "
        f"{os.getloadavg()[0]:.1f} when written (other jobs share the cores).",
        "",
        f"Time per training step (gradient + statistics + update), batch {BATCH}, "
        f"amortized over a refresh period of {PERIOD} steps (roots, bases or inverses "
        f"recomputed once per period); Shampoo block size 1024, K-FAC with its "
        "statistics (one extra forward and backward pass) every step.",
        "",
        "| model | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for model, t in timings.items():
        cells = [f"{1e3 * t['adam']:.2f} ms (1×)"] + [
            f"{1e3 * t[n]:.2f} ms ({t[n] / t['adam']:.1f}×)" for n in names[1:]]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Steps to a training loss of {TARGET} on MNIST-1D (4 000 examples, batches of "
        f"{BATCH}, MLP 40-256-256-10, loss on the whole training set every {EVAL_EVERY} "
        f"steps, at most {MAX_STEPS} steps), best of three learning rates each; the "
        "time to target is steps × the time per step above.",
        "",
        "| optimizer | learning rate | steps to target | time to target | final loss |",
        "|---|---|---|---|---|",
    ]
    t256 = timings["40-256-256-10"]
    for n in names:
        r = runs[n]
        steps = r["steps"]
        lines.append(
            f"| {n} | {r['lr']:g} | {steps if steps else f'> {MAX_STEPS}'} | "
            f"{f'{steps * t256[n]:.2f} s' if steps else '—'} | {r['final']:.1e} |")
    text = "\n".join(lines)
    print(text)
    write_section("bench_second_order", text)


if __name__ == "__main__":
    main()
