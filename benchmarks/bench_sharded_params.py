"""Curvature of a GPT-2-small-size decoder with its parameters sharded over 8 devices.

A decoder-only transformer (`benchmarks._decoder.Config()`: 12 layers, width 768,
12 heads, vocabulary 50 257, 1 024 positions, tied embedding: 124M float32
parameters) on synthetic token sequences, its Hessian sharded with
`ls.shard(H, mesh=mesh)` over a 1×8 mesh of simulated CPU devices (every weight
FSDP-style over the 8-device "model" axis; a 2×4 mesh, with the examples over "data",
replicates the Lanczos basis twice and ran out of this 24 GB machine in λ_max).
Measured, once each (the programs are large; compile and run times are reported
apart where they can be): λ_max (top 3, adaptive Lanczos with the largest basis in
`EIG_ROWS` whose compiled peak fits the host), the trace (Hutchinson) and per-block
λ_max (embeddings, attention, MLP, norms; `per_block` as a user calls it, one program
per block), and per-device memory from the compiled programs
(`ls.memory.device_memory`). Then a 1.3B configuration's fixed-step Lanczos is
compiled only (abstract parameters, nothing allocated), to give its per-device memory
on an 8-device mesh.

Simulated devices are threads on this machine's cores: this shows the sharded
programs run and what each device holds, not the speed of eight real devices. A
longer collective timeout keeps a loaded machine from aborting a rendezvous.

Run: `.venv/bin/python -m benchmarks.bench_sharded_params [--small] [--reuse-big]`
(`--reuse-big` keeps the 1.3B row already in RESULTS.md, when it is of this table,
instead of compiling it again).
"""

from __future__ import annotations

import os

_FLAGS = ("--xla_force_host_platform_device_count=8 "
          "--xla_cpu_collective_timeout_seconds=7200 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=7200 "
          "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAGS).strip()

import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import landscape as ls  # noqa: E402
from benchmarks import _decoder as dec  # noqa: E402
from benchmarks._results import RESULTS, machine, write_section  # noqa: E402
from landscape import sharding  # noqa: E402

MESH = (1, 8)
SEQ, SEQS, CHUNK = 32, 4, 2          # tokens per sequence, sequences, sequences per chunk
# λ_max rows: the first that fits the host (8 devices' shares of the compiled peak).
EIG_ROWS, TRACE_PROBES, BLOCK_STEPS = (12, 6), 2, 3
# Plain products: the 8 simulated devices share this machine's 24 GB, and with the
# default mode="auto" the λ_max program (linearized products) ran out of it twice.
MODE = "plain"
BLOCKS = {
    "embeddings": lambda path, _: "embed" in path or "pos" in path,
    "attention": lambda path, _: "attn" in path,
    "mlp": lambda path, _: "mlp" in path,
    "norms": lambda path, _: "ln" in path,
}
# The 1.3B configuration, compiled only: what fits 80 GB per device on 8 devices.
BIG = dict(seq=1024, remat=True)
BIG_MESH, BIG_SEQS, BIG_CHUNK, BIG_STEPS = (1, 8), 8, 1, 20
GIB = 2**30


def _timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def _abstract_operator(cfg, mesh, seqs, chunk):
    """The sharded Hessian of `cfg` with abstract parameters and data (shapes and
    shardings only): enough to compile its programs without allocating them."""
    shapes = jax.eval_shape(lambda: dec.init(jax.random.key(0), cfg))
    specs = jax.tree.map(lambda s: sharding.fsdp_spec(s.shape, mesh, "model"), shapes)
    params = jax.tree.map(lambda s, p: jax.ShapeDtypeStruct(
        s.shape, s.dtype, sharding=NamedSharding(mesh, p)), shapes, specs,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    toks = jax.ShapeDtypeStruct((seqs, cfg.seq + 1), jnp.int32,
                                sharding=NamedSharding(mesh, P("data")))
    # The builder checks the loss on a concrete first chunk (tokens are small).
    H = ls.hessian(dec.loss_fn(cfg), params, jnp.zeros(toks.shape, toks.dtype),
                   chunk_size=chunk)
    return dataclasses.replace(H, batch=toks, layout=sharding.Layout(mesh, ("data",)))


def _mem_line(label, mem):
    return (f"| {label} | {mem.params / GIB:.3f} | {mem.params_total / GIB:.3f} | "
            f"{mem.matvec.argument / GIB:.2f} | {mem.matvec.temp / GIB:.2f} | "
            f"{mem.matvec.total / GIB:.2f} | {mem.basis / GIB:.2f} | "
            f"{mem.eigenvalues.total / GIB:.2f} |")


def _room(per_device):
    """Whether every local device's share fits the host's free memory (with a margin):
    simulated devices share it. Memory the earlier tasks freed goes back to the system
    first (glibc keeps freed pages otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    need = jax.local_device_count() * per_device
    return need <= 0.8 * free, f"{need / GIB:.1f} GiB for {jax.local_device_count()} " \
        f"devices, {free / GIB:.1f} GiB free"


def main(small: bool = False, reuse_big: bool = False) -> None:
    start = time.perf_counter()
    # Read before this run rewrites its section.
    kept = [line for line in RESULTS.read_text().splitlines() if reuse_big and (
        "B (compiled only)" in line or line.startswith("The 1.3B row"))]
    if not any("fixed-step" in line for line in kept):   # an older table's row
        kept = []
    mesh = sharding.auto_mesh(jax.make_mesh(MESH, ("data", "model")))
    cfg = dec.Config(seq=1024) if not small else dec.Config(
        vocab=512, seq=64, layers=2, width=64, heads=4)
    params = dec.init(jax.random.key(1), cfg)
    toks = dec.tokens(jax.random.key(2), dataclasses.replace(cfg, seq=SEQ), SEQS)
    H = ls.shard(ls.hessian(dec.loss_fn(cfg), params, toks, chunk_size=CHUNK), mesh=mesh)
    n = H.size
    key = jax.random.key(0)
    print(f"{n:,} parameters on {mesh.shape}", flush=True)
    head = [
        f"Machine: {machine()}; 8 simulated CPU devices (`XLA_FLAGS={_FLAGS}`), mesh "
        f"{MESH[0]}×{MESH[1]} (data × model). Times are wall-clock on a machine shared "
        f"with other work (the load average at the end is below).",
        "",
        f"Model: decoder-only transformer, {cfg.layers} layers, width {cfg.width}, "
        f"{cfg.heads} heads, vocabulary {cfg.vocab:,}, {cfg.seq} positions, tied "
        f"embedding: **{n:,} float32 parameters**, every weight split FSDP-style over "
        f"the model axis (`ls.shard(H, mesh=mesh)`). Data: {SEQS} synthetic sequences of "
        f"{SEQ} tokens (random walks over the vocabulary), split over the data axis, "
        f"chunks of {CHUNK} sequences. Products: `mode={MODE!r}`.",
    ]
    mem_rows = ["", "Per-device memory from the compiled programs (`ls.memory.device_memory"
                "(H, k, max_steps=...)`, GiB): the device's share of the parameters against "
                "all of them, one product (arguments: its shards of parameters and data; "
                "temporaries), the Lanczos basis, and the whole `ls.eigenvalues` program "
                "with these arguments (its peak: arguments, outputs and temporaries).",
                "", "| model | params / device | params total | matvec args | matvec temp "
                "| matvec total | basis | `eigenvalues` program total |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
    task_rows = ["", "Each task's program is compiled first (its per-device peak read from "
                 "the compiled program), and run only if the eight devices' shares fit the "
                 "host's free memory; the run reuses that compilation.", "",
                 "| task | setting | products | per-device peak | compile | run | result |",
                 "|---|---|---:|---:|---:|---:|---|"]
    notes = []

    def write():
        text = "\n".join(head + mem_rows + task_rows + notes + [
            "", f"Run so far {time.perf_counter() - start:.0f} s; load average "
            f"{os.getloadavg()[0]:.1f}."])
        print(text, flush=True)
        if not small:
            write_section("bench_sharded_params", "## Parameter-sharded curvature: a 124M "
                          "decoder on 8 simulated devices (`bench_sharded_params`)\n\n"
                          + text)

    def task(label, setting, per_device, t_compile, run, products, result):
        fits, room = _room(per_device)
        if not fits:
            task_rows.append(f"| {label} | {setting} | | {per_device / GIB:.2f} GiB | "
                             f"{t_compile:.0f} s | not run | needs {room} |")
        else:
            out, t_run = _timed(run)
            task_rows.append(f"| {label} | {setting} | {products(out)} | "
                             f"{per_device / GIB:.2f} GiB | {t_compile:.0f} s | "
                             f"{t_run:.1f} s | {result(out)} |")
        write()

    for rows in EIG_ROWS:
        eig_args = dict(k=3, max_steps=rows, check=False, mode=MODE)
        t0 = time.perf_counter()
        mem = ls.memory.device_memory(H, **eig_args)
        t_mem = time.perf_counter() - t0
        if _room(mem.eigenvalues.total)[0] or rows == EIG_ROWS[-1]:
            break
        notes += ["", f"A {rows}-row basis needs {mem.eigenvalues.total / GIB:.2f} GiB "
                  f"per device ({_room(mem.eigenvalues.total)[1]}): not run."]
    mem_rows.append(_mem_line(f"{n / 1e6:.0f}M, {SEQS}×{SEQ} tokens, chunk {CHUNK}, "
                              f"{rows}-row basis", mem))
    write()
    task("λ_max, top 3", f"adaptive Lanczos, `max_steps={rows}`, no repeat check",
         mem.eigenvalues.total, t_mem, lambda: ls.eigenvalues(H, key=key, **eig_args),
         lambda e: int(e.num_matvecs),
         lambda e: ", ".join(f"{float(x):.4g}" for x in e.values) + " (residual/|λ| "
         + ", ".join(f"{float(r / abs(x)):.1e}" for r, x in zip(e.residuals, e.values))
         + ")")

    def trace_fn(o, k):
        return ls.trace(o, key=k, num_probes=TRACE_PROBES, method="hutchinson", mode=MODE)

    t0 = time.perf_counter()
    est = ls.memory.memory_estimate(trace_fn, H, key)   # jax.jit(trace_fn) reuses it
    task("trace", f"Hutchinson, {TRACE_PROBES} probes", est.total,
         time.perf_counter() - t0, lambda: jax.jit(trace_fn)(H, key),
         lambda _: TRACE_PROBES, lambda t: f"{float(t.value):.4g} ± {float(t.std_error):.2g}")
    # `per_block` as a user calls it: one program per block. Each block's eigenvalues
    # program is compiled first (`device_memory` with per_block's arguments), so the
    # call below reuses it; the shared trace compiles inside the run.
    t0 = time.perf_counter()
    peak = max(ls.memory.device_memory(ls.restrict(H, select), 1, tol=1e-3,
                                       num_steps=BLOCK_STEPS, mode=MODE).eigenvalues.total
               for select in BLOCKS.values())
    task("per-block λ_max", f"{len(BLOCKS)} blocks, {BLOCK_STEPS} Lanczos steps each, "
         "shared trace 2 probes (compiled in the run)", peak, time.perf_counter() - t0,
         lambda: ls.per_block(H, BLOCKS, key=key, num_steps=BLOCK_STEPS, trace_probes=2,
                              mode=MODE),
         lambda _: len(BLOCKS) * (BLOCK_STEPS + 1) + 2,
         lambda b: ", ".join(f"{k} {float(r.lambda_max):.4g}" for k, r in b.items()))
    if small:
        return
    if len(kept) == 2:         # `--reuse-big`: the 1.3B compile takes over half an hour
        mem_rows.append(kept[0])
        notes += ["", kept[1]]
        write()
        return
    big = dec.Config.gpt_1b(**BIG)
    m = sharding.auto_mesh(jax.make_mesh(BIG_MESH, ("data", "model")))
    t0 = time.perf_counter()
    big_mem = ls.memory.device_memory(_abstract_operator(big, m, BIG_SEQS, BIG_CHUNK),
                                      k=3, num_steps=BIG_STEPS, mode=MODE)
    mem_rows.append(_mem_line(
        f"{dec.num_params(big) / 1e9:.2f}B (compiled only), mesh {BIG_MESH[0]}×"
        f"{BIG_MESH[1]}, {BIG_SEQS}×{big.seq} tokens, chunk {BIG_CHUNK}, remat, "
        f"{BIG_STEPS}-row basis", big_mem))
    notes += ["", f"The 1.3B row ({big.layers} layers, width {big.width}, "
              f"{big.heads} heads, {big.seq} positions, `jax.checkpoint` on every "
              f"block) is compiled from abstract parameters and never run "
              f"({time.perf_counter() - t0:.0f} s to compile): one device of an "
              f"8×80 GB node needs the '`eigenvalues` program total' column for "
              f"`ls.eigenvalues(H, k=3, num_steps={BIG_STEPS}, mode={MODE!r})` "
              f"(the fixed-step routine, whose loop holds one product; the adaptive "
              f"routine's temporaries were 1.60 basis sizes against 1.44 on the "
              f"memory test's MLP)."]
    write()


if __name__ == "__main__":
    main(small="--small" in sys.argv, reuse_big="--reuse-big" in sys.argv)
