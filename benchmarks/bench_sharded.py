"""λ_max and trace over 4 000 examples on one device against eight simulated devices.

The reference MLP (`benchmarks._reference_mlp`, briefly trained once in this process
and saved) is loaded by two worker processes: one with the default single CPU device,
one with `XLA_FLAGS=--xla_force_host_platform_device_count=8` whose batch is split with
`ls.shard_batch` (500 examples per device, one chunk each; the single device runs the
same 4 000 examples in 8 chunks of 500). Each times λ_max (Lanczos, 20 steps) and the
trace (Hutch++, 30 probes) with the same key. The eight-device worker also times the
unsharded operator, since the flag alone changes single-device speed.

Simulated devices are threads of one process on the same CPU cores (two here), so this
measures that sharding is correct and what its overhead is, not a speed-up that real
devices would give.

Run: `.venv/bin/python -m benchmarks.bench_sharded`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHUNK, STEPS, PROBES, REPEATS = 500, 20, 30, 3
ROOT = Path(__file__).resolve().parents[1]


def worker(path: str) -> dict:
    import jax
    import jax.numpy as jnp

    import landscape as ls
    from benchmarks import _reference_mlp as ref
    from benchmarks._results import median_time

    saved = np.load(path)
    params = [{"w": jnp.asarray(saved[f"w{i}"]), "b": jnp.asarray(saved[f"b{i}"])}
              for i in range(len(ref.SIZES) - 1)]
    x, y = ref.data()
    batch = (jnp.asarray(x), jnp.asarray(y))
    key = jax.random.key(0)
    out = {"devices": jax.local_device_count()}
    ops = {"unsharded": ls.hessian(ref.loss_fn, params, batch, chunk_size=CHUNK)}
    if jax.local_device_count() > 1:
        ops["sharded"] = ls.hessian(ref.loss_fn, params, ls.shard_batch(batch),
                                    chunk_size=CHUNK)
    for name, H in ops.items():
        def eig(H=H):
            return jax.block_until_ready(ls.eigenvalues(H, 1, key=key, num_steps=STEPS))

        def tr(H=H):
            return jax.block_until_ready(ls.trace(H, key=key, num_probes=PROBES))

        e, t = eig(), tr()
        out[name] = {"eig_s": median_time(eig, repeats=REPEATS, warmup=0),
                     "trace_s": median_time(tr, repeats=REPEATS, warmup=0),
                     "lambda_max": float(e.values[0]),
                     "trace": float(t.value), "trace_err": float(t.std_error)}
    return out


def _run(path: str, devices: int) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_sharded", "--worker",
                           path], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from benchmarks import _reference_mlp as ref
    from benchmarks._results import machine, write_section

    x, y = ref.data()
    params, loss = ref.trained(x, y)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "params.npz")
        np.savez(path, **{f"{k}{i}": np.asarray(layer[k]) for i, layer in enumerate(params)
                          for k in ("w", "b")})
        one, eight = _run(path, 1), _run(path, 8)
    base = one["unsharded"]
    rows = ["| devices | batch | λ_max | trace (Hutch++) | λ_max time | trace time | "
            "time vs 1 device |", "|---|---|---|---|---|---|---|"]

    def row(label, batch, r):
        ratio = (r["eig_s"] + r["trace_s"]) / (base["eig_s"] + base["trace_s"])
        rows.append(f"| {label} | {batch} | {r['lambda_max']:.6f} | {r['trace']:.4f} ± "
                    f"{r['trace_err']:.4f} | {r['eig_s']:.2f} s | {r['trace_s']:.2f} s | "
                    f"{ratio:.2f}× |")

    row("1", "one device", base)
    row("8 simulated", "unsharded (flag set)", eight["unsharded"])
    row("8 simulated", "`ls.shard_batch`", eight["sharded"])
    s = eight["sharded"]
    md = "\n".join([
        "## Sharded operators (`bench_sharded`)", "",
        f"Machine: {machine()}; shared with other jobs while this ran (load average well "
        "above the core count), so absolute times are inflated.", "",
        f"Hessian of the reference MLP (78 858 parameters, {ref.TRAIN_STEPS} SGD steps, "
        f"training loss {loss:.3f}) over all 4 000 MNIST-1D examples, chunks of {CHUNK}; "
        f"λ_max from {STEPS} Lanczos steps, trace from {PROBES} Hutch++ probes, same key "
        f"everywhere; medians of {REPEATS}.", "",
        *rows, "",
        f"Sharded against one device: λ_max differs by "
        f"{abs(s['lambda_max'] - base['lambda_max']) / abs(base['lambda_max']):.1e} "
        f"(relative) and the trace by "
        f"{abs(s['trace'] - base['trace']) / abs(base['trace']):.1e}, float32 rounding "
        "from a different order of summation. The eight simulated devices are threads "
        "sharing this machine's two cores, so no speed-up is possible here; the table "
        "shows the cost of the per-matvec all-reduce and of the simulation. The two "
        "workers run one after the other on a machine whose load changed while they "
        "ran (the unsharded row with the flag set coming out faster than one device "
        "is that noise), so read the times as rough. On real devices each holds an "
        "eighth of the examples and does an eighth of the work.",
    ])
    write_section("bench_sharded", md)
    print(md)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(sys.argv[2])))
    else:
        main()
