"""Agreement of Basin's K-FAC direction with kfac-jax's on the same pure-JAX model.

kfac-jax 0.0.8 runs only with jax <= 0.9.1 while Basin needs jax >= 0.10, so the two run
in separate environments and exchange arrays through .npz files:

    python3 -m venv .venv-kfac
    .venv-kfac/bin/pip install -q 'jax==0.9.1' 'jaxlib==0.9.1' kfac-jax optax numpy
    .venv/bin/python -m benchmarks.kfac_agreement          # calls .venv-kfac itself

Both sides take one K-FAC step from the same weights on the same batch with learning
rate 1, no momentum, fixed damping λ and factored (π-adjusted) Tikhonov damping, and
the factors estimated from that batch alone. kfac-jax uses the exact expectation over
the model's labels (`estimation_mode="fisher_exact"`); Basin samples `NUM_SAMPLES`
labels per example, so a small Monte-Carlo difference remains. Written to the
`kfac_agreement` section of RESULTS.md; not part of the test suite.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SIZES = (20, 32, 32, 5)
N = 128
DAMPINGS = (1e-1, 1e-2, 1e-3)
NUM_SAMPLES = 4096
ROOT = Path(__file__).resolve().parents[1]


def make_problem(path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(N, SIZES[0])), "y": rng.integers(0, SIZES[-1], N)}
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        arrays[f"w{i}"] = rng.normal(size=(a, b)) / np.sqrt(a)
        arrays[f"b{i}"] = 0.1 * rng.normal(size=b)
    np.savez(path, **arrays)


def _params(data, jnp):
    return [{"w": jnp.asarray(data[f"w{i}"]), "b": jnp.asarray(data[f"b{i}"])}
            for i in range(len(SIZES) - 1)]


def _apply(params, x):
    import jax
    for layer in params[:-1]:
        x = jax.numpy.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def run_kfac_jax(problem: Path, out: Path) -> None:
    """Runs inside .venv-kfac: one kfac-jax step per damping; saves the directions."""
    import jax
    import jax.numpy as jnp
    import kfac_jax
    import optax

    jax.config.update("jax_enable_x64", True)
    data = np.load(problem)
    batch = (jnp.asarray(data["x"]), jnp.asarray(data["y"]))

    def loss_fn(p, b):
        logits = _apply(p, b[0])
        kfac_jax.register_softmax_cross_entropy_loss(logits, b[1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean()

    results = {}
    for lam in DAMPINGS:
        opt = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
            use_adaptive_learning_rate=False, use_adaptive_momentum=False,
            use_adaptive_damping=False, estimation_mode="fisher_exact",
            curvature_ema=0.95, inverse_update_period=1, num_burnin_steps=0,
            multi_device=False)
        key = jax.random.key(0)
        params = _params(data, jnp)   # kfac-jax donates the parameters it steps from
        state = opt.init(params, key, batch)
        new, _, _ = opt.step(params, state, key, batch=batch,
                             learning_rate=jnp.asarray(1.0), momentum=jnp.asarray(0.0),
                             damping=jnp.asarray(lam), global_step_int=0)
        for i, p1 in enumerate(new):
            results[f"{lam}_w{i}"] = data[f"w{i}"] - np.asarray(p1["w"])
            results[f"{lam}_b{i}"] = data[f"b{i}"] - np.asarray(p1["b"])
    results["version"] = np.asarray(f"kfac-jax {kfac_jax.__version__}, jax {jax.__version__}")
    np.savez(out, **results)


def run_basin(problem: Path) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from landscape import cross_entropy
    from transforms.kfac import find_dense_layers, kfac_statistics, scale_by_kfac

    data = np.load(problem)
    params = _params(data, jnp)
    x, y = jnp.asarray(data["x"]), jnp.asarray(data["y"])
    grads = jax.grad(lambda p: cross_entropy(_apply(p, x), y))(params)
    layers = find_dense_layers(_apply, params, x)
    stats = kfac_statistics(_apply, params, x, key=jax.random.key(1),
                            num_samples=NUM_SAMPLES)
    out = {}
    for lam in DAMPINGS:
        opt = scale_by_kfac(layers, damping=lam, inverse_every=1, tikhonov="factored")
        d, _ = opt.update(grads, opt.init(params), statistics=stats)
        for i, layer in enumerate(d):
            out[f"{lam}_w{i}"] = np.asarray(layer["w"])
            out[f"{lam}_b{i}"] = np.asarray(layer["b"])
    return out


def main() -> None:
    from benchmarks._results import machine, write_section

    venv_python = ROOT / ".venv-kfac" / "bin" / "python"
    with tempfile.TemporaryDirectory() as tmp:
        problem, ref_path = Path(tmp) / "problem.npz", Path(tmp) / "kfac_jax.npz"
        make_problem(problem)
        subprocess.run([str(venv_python), str(Path(__file__).resolve()), "--kfac-jax",
                        str(problem), str(ref_path)], check=True, cwd=ROOT)
        ref = dict(np.load(ref_path))
        ours = run_basin(problem)

    lines = [
        "## K-FAC agreement with kfac-jax (`benchmarks/kfac_agreement.py`)",
        "",
        f"Machine: {machine()}; reference: {ref['version']}. One K-FAC step (learning "
        f"rate 1, no momentum, factored Tikhonov damping, factors from one batch) on a "
        f"pure-JAX tanh MLP {'-'.join(map(str, SIZES))} with {N} examples, float64. "
        f"kfac-jax uses the exact label expectation; Basin samples {NUM_SAMPLES} labels "
        "per example. Per layer: cosine and relative difference ‖d_ours − d_ref‖/‖d_ref‖ "
        "of the kernel-and-bias direction.",
        "",
        "| damping λ | layer | cosine | relative difference | norm ratio ours/ref |",
        "|---|---|---|---|---|",
    ]
    for lam in DAMPINGS:
        for i in range(len(SIZES) - 1):
            a = np.concatenate([ours[f"{lam}_w{i}"].ravel(), ours[f"{lam}_b{i}"]])
            b = np.concatenate([ref[f"{lam}_w{i}"].ravel(), ref[f"{lam}_b{i}"]])
            cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
            rel = np.linalg.norm(a - b) / np.linalg.norm(b)
            ratio = np.linalg.norm(a) / np.linalg.norm(b)
            lines.append(f"| {lam:g} | {i} | {cos:.6f} | {rel:.1e} | {ratio:.4f} |")
    text = "\n".join(lines)
    print(text)
    write_section("kfac_agreement", text)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--kfac-jax":
        run_kfac_jax(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        main()
