"""Compiled memory estimates, chunk sizes for a budget, and the GGN's memory with many
classes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from landscape import memory


def test_estimate_counts_arguments_and_outputs_exactly():
    x = jax.ShapeDtypeStruct((300, 40), jnp.float32)
    w = jax.ShapeDtypeStruct((40, 70), jnp.float32)
    est = memory.memory_estimate(lambda a, b: a @ b, x, w)
    assert est.argument == 4 * (300 * 40 + 40 * 70)
    assert est.output == 4 * 300 * 70
    assert est.total == est.argument + est.output + est.temp - est.alias
    with pytest.raises(ValueError, match="fn"):
        memory.memory_estimate(3, x)


def _wide_model(classes, d=20, hidden=16):
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (d, hidden)) / math.sqrt(d),
              "w2": jax.random.normal(k2, (hidden, classes)) / math.sqrt(hidden)}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    return apply_fn, params


def test_ggn_with_many_classes_never_forms_a_batch_classes_classes_tensor():
    n, classes = 256, 1000
    apply_fn, params = _wide_model(classes)
    x = jax.ShapeDtypeStruct((n, 20), jnp.float64)
    y = jax.ShapeDtypeStruct((n,), jnp.int32)

    def grad(p, x, y):
        return jax.grad(lambda q: ls.cross_entropy(apply_fn(q, x), y))(p)

    def ggn_mv(p, x, y, v):
        return ls.ggn(apply_fn, p, (x, y)).matvec(v)

    def fisher_mv(p, x, y, v):
        return ls.fisher(apply_fn, p, (x, y), kind="empirical").matvec(v)

    g = memory.memory_estimate(grad, params, x, y)
    v = params
    for mv in (ggn_mv, fisher_mv):
        est = memory.memory_estimate(mv, params, x, y, v)
        # The explicit output Hessians alone would be n·C²·8 bytes = 2 GB; the matvec's
        # temporaries stay within a few gradients' worth (each n·C·8 = 2 MB).
        assert est.temp < 4 * g.temp + 8 * n * classes, (est, g)
        assert est.temp < 1e-2 * n * classes * classes * 8


def test_chunk_size_for_budget_picks_the_largest_chunk_that_fits():
    n, classes = 48, 50
    apply_fn, params = _wide_model(classes)
    kx, ky = jax.random.split(jax.random.key(1))
    data = (jax.random.normal(kx, (n, 20)), jax.random.randint(ky, (n,), 0, classes))

    def build(c):
        return ls.ggn(apply_fn, params, data, chunk_size=c)

    whole = memory.matvec_memory(build(None)).total
    small = memory.matvec_memory(build(4)).total
    assert small < whole  # chunking bounds the temporaries
    budget = (small + whole) // 2
    choice = memory.chunk_size_for_budget(build, budget, num_examples=n)
    assert choice.chunk_size is not None and n % choice.chunk_size == 0
    assert choice.estimate.total <= budget
    # The next larger divisor does not fit (measured independently here).
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    bigger = divisors[divisors.index(choice.chunk_size) + 1]
    assert memory.matvec_memory(build(None if bigger == n else bigger)).total > budget
    # The chunked operator is the same matrix.
    v = jax.tree.map(jnp.ones_like, params)
    np.testing.assert_allclose(ravel_pytree(build(choice.chunk_size).matvec(v))[0],
                               ravel_pytree(build(None).matvec(v))[0], rtol=1e-10)
    # A budget the whole batch fits in needs no chunks; one too small is an error.
    assert memory.chunk_size_for_budget(build, 10 * whole, num_examples=n).chunk_size is None
    with pytest.raises(ValueError, match="budget_bytes"):
        memory.chunk_size_for_budget(build, 1000, num_examples=n)
    with pytest.raises(ValueError, match="budget_bytes"):
        memory.chunk_size_for_budget(build, -5, num_examples=n)
    with pytest.raises(ValueError, match="candidates"):
        memory.chunk_size_for_budget(build, budget, num_examples=n, candidates=[500])
    with pytest.raises(ValueError, match="op"):
        memory.matvec_memory(lambda v: v)


def _mlp_hessian(width=64, layers=3):
    keys = jax.random.split(jax.random.key(0), layers + 2)
    params = [jax.random.normal(k, (width, width)) / math.sqrt(width) for k in keys[:layers]]
    x = jax.random.normal(keys[-2], (32, width))
    y = jax.random.randint(keys[-1], (32,), 0, width)

    def loss_fn(p, batch):
        h = batch[0]
        for w in p:
            h = jnp.tanh(h @ w)
        return -jnp.mean(jax.nn.log_softmax(h)[jnp.arange(h.shape[0]), batch[1]])

    return ls.hessian(loss_fn, params, (x, y))


def test_device_memory_compiles_the_program_eigenvalues_runs(caplog):
    H = _mlp_hessian()
    n, row = H.size, H.size * jnp.dtype(H.dtype).itemsize
    mem = memory.device_memory(H, k=3, max_steps=12, check=False, mode="plain")
    assert (mem.rows, mem.basis, mem.params, mem.params_total) == (12, 12 * row, row, row)
    # The program holds its basis (and, without checks and this small, a second stack
    # of the products taken), its parameters and its three output vectors.
    assert mem.eigenvalues.total >= 2 * mem.basis + row + 3 * row
    assert mem.eigenvalues.output >= 3 * row
    # The call with the same arguments compiles nothing more.
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        eig = ls.eigenvalues(H, k=3, key=jax.random.key(7), max_steps=12, check=False,
                             mode="plain")
    assert not [r for r in caplog.records if "_adaptive_eigen" in r.getMessage()
                and "compilation" in r.getMessage()], caplog.text
    assert eig.values.shape == (3,)
    # Rows: the defaults of eigenvalues (max(3w, w + 30)), a fixed-step run's steps.
    assert memory.device_memory(H).rows == 31
    assert memory.device_memory(H, k=2, which="both").rows == 34
    fixed = memory.device_memory(H, num_steps=20)
    assert fixed.rows == 20 and fixed.eigenvalues.total >= 20 * row
    # More rows: at least one basis row more per row, measured from two compilations.
    small = memory.device_memory(H, k=3, max_steps=6, check=False, mode="plain")
    assert mem.eigenvalues.total - small.eigenvalues.total >= 6 * row
    assert n == 3 * 64 * 64
    with pytest.raises(ValueError, match="max_steps"):
        memory.device_memory(H, k=3, max_steps=2)
    with pytest.raises(ValueError, match="operator"):
        memory.device_memory(object())
