"""Shampoo and SOAP inside a vmapped group of members that share the step count.

Each member alone (standalone `update`, its own counter, Python-float settings) is the
reference for the same member inside a group (`vmap` over traced settings, `step=`
unbatched); the refresh is counted through the decomposition seam and located in the
jaxpr; the hang of batched `eigh` in vmapped sweeps on a 2-core CPU is exercised 20 times.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transforms import _second_order_blocks as blocks
from transforms.shampoo import shampoo
from transforms.soap import soap

MEMBERS = 8
LRS = np.geomspace(1e-3, 3e-2, MEMBERS)
B1S = np.linspace(0.8, 0.95, MEMBERS)
B2S = np.linspace(0.9, 0.999, MEMBERS)
EPS = np.geomspace(1e-8, 1e-4, MEMBERS)

MAKERS = {
    "shampoo": lambda lr, b1, b2, eps: shampoo(lr, b1=b1, b2=b2, eps=eps, block_size=4,
                                               precondition_every=3,
                                               start_preconditioning_step=1),
    # from step 6 the statistics (blocks of at most 4) are of full rank: a basis of a
    # rank-deficient statistic is arbitrary inside its null space, so round-off would
    # pick different ones for two runs
    "soap": lambda lr, b1, b2, eps: soap(lr, b1=b1, b2=b2, eps=eps, block_size=4,
                                         precondition_every=3, basis="eigh",
                                         start_preconditioning_step=6),
    "soap_qr": lambda lr, b1, b2, eps: soap(lr, b1=b1, b2=b2, eps=eps, block_size=4,
                                            precondition_every=3, basis="qr",
                                            start_preconditioning_step=6),
}


def problem(dtype=jnp.float32):
    """A quadratic whose gradient depends on the parameters (so members drift apart);
    a blocked matrix, a rank-3 tensor and a vector."""
    rng = np.random.default_rng(0)
    target = {"w": rng.normal(size=(6, 5)), "t": rng.normal(size=(3, 4, 5)),
              "b": rng.normal(size=5)}
    target = jax.tree.map(lambda x: jnp.asarray(x, dtype), target)
    scale = jax.tree.map(lambda x: jnp.asarray(rng.uniform(0.5, 3.0, x.shape), dtype),
                         target)
    params = jax.tree.map(jnp.zeros_like, target)

    def grad(p, t):
        noise = jnp.sin(t + jnp.arange(5, dtype=dtype))   # varies the statistics' shape
        return jax.tree.map(lambda x, a, c: a * (x - c) + 0.1 * noise[..., -1:] * a,
                            p, scale, target)
    return params, grad


def run(make, hyper, steps, group, state=None):
    """Parameters after `steps` steps; with `group`, the step count is passed as `step`."""
    params, grad = problem()
    opt = make(*hyper)

    def body(carry, t):
        p, s = carry
        extra = {"step": t} if group else {}
        u, s = opt.update(grad(p, t.astype(jnp.float32)), s, p, **extra)
        return (optax.apply_updates(p, u), s), None

    state = opt.init(params) if state is None else state
    (p, _), _ = jax.lax.scan(body, (params, state), jnp.arange(steps))
    return p


def group_run(make, steps):
    """The group as the runner holds it: states made per member (their counters batched,
    so only `step=` keeps the refresh a branch)."""
    hyper = [jnp.asarray(h, jnp.float32) for h in (LRS, B1S, B2S, EPS)]
    states = jax.vmap(lambda *h: make(*h).init(problem()[0]))(*hyper)
    return jax.jit(jax.vmap(lambda s, *h: run(make, h, steps, True, s)))(states, *hyper)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_group_members_equal_members_alone(name):
    """Sweeping lr, b1, b2 and eps vmaps; each member equals its standalone run."""
    steps = 13
    together = group_run(MAKERS[name], steps)
    for i in (0, MEMBERS - 1):   # each standalone run is its own compilation
        hyper = (float(LRS[i]), float(B1S[i]), float(B2S[i]), float(EPS[i]))
        alone = jax.jit(lambda: run(MAKERS[name], hyper, steps, False))()
        for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_refresh_runs_once_per_period_in_a_group(name, monkeypatch):
    """Every decomposition passes the `_eigh` seam; a `select` would run it every step."""
    calls = []
    original = blocks._eigh

    def counted(x):
        jax.debug.callback(lambda x: calls.append(1), x)
        return original(x)

    monkeypatch.setattr(blocks, "_eigh", counted)
    steps, period = 18, 3
    alone = jax.jit(lambda: run(MAKERS[name], (0.01, 0.9, 0.99, 1e-6), steps, False))
    jax.block_until_ready(alone())
    per_member = len(calls)
    params, _ = problem()
    num_stats = sum(blocks.make_plan(x.shape, 4).rank for x in jax.tree.leaves(params)
                    if x.ndim > 1)
    start = 1 if name == "shampoo" else 6
    assert per_member == num_stats * ((steps - start - 1) // period + 1)
    calls.clear()
    jax.block_until_ready(group_run(MAKERS[name], steps))
    assert len(calls) == MEMBERS * per_member


def _primitives(jaxpr, inside_cond=False):
    """(primitive name, whether under a `cond`) for every equation, recursively."""
    out = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out.append((name, inside_cond))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _primitives(sub, inside_cond or name == "cond")
    return out


@pytest.mark.parametrize("name", ["shampoo", "soap_qr"])
def test_vmapped_update_keeps_decompositions_under_a_cond(name):
    params, grad = problem()
    opt = MAKERS[name](0.01, 0.9, 0.99, 1e-6)
    state = opt.init(params)
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * MEMBERS), tree)  # noqa

    def update(g, s, step):
        return opt.update(g, s, None, step=step)

    jaxpr = jax.make_jaxpr(jax.vmap(update, in_axes=(0, 0, None)))(
        stack(grad(params, 0.0)), stack(state), jnp.asarray(3))
    prims = _primitives(jaxpr.jaxpr)
    lapack = [inside for p, inside in prims if p in ("eigh", "householder_product",
                                                     "geqrf")]
    assert lapack and all(lapack), prims
    assert ("cond", False) in prims


def _hang_probe(make):
    """A group of 8 on an MLP 8-16-4 for three refresh periods (30 steps)."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (64, 8))
    y = jax.random.randint(key, (64,), 0, 4)
    sizes = (8, 16, 4)
    params = [{"w": jax.random.normal(jax.random.fold_in(key, i), (a, b)) / np.sqrt(a),
               "b": jnp.zeros(b)} for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]

    def loss(p):
        h = x
        for layer in p[:-1]:
            h = jax.nn.relu(h @ layer["w"] + layer["b"])
        return optax.softmax_cross_entropy_with_integer_labels(
            h @ p[-1]["w"] + p[-1]["b"], y).mean()

    def member(lr):
        opt = make(lr)

        def body(carry, t):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p, step=t)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(30))
        return loss(p)

    return jax.jit(jax.vmap(member))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["shampoo", "soap", "soap_qr"])
def test_group_of_eight_never_hangs(name):
    make = {"shampoo": lambda lr: shampoo(lr, start_preconditioning_step=0),
            "soap": lambda lr: soap(lr),
            "soap_qr": lambda lr: soap(lr, basis="qr")}[name]
    run_group = _hang_probe(make)
    lrs = jnp.asarray(LRS)
    first = np.asarray(run_group(lrs))
    for _ in range(19):
        np.testing.assert_array_equal(np.asarray(run_group(lrs)), first)
    assert np.all(np.isfinite(first))


@pytest.mark.parametrize("name", ["shampoo", "soap"])
def test_failed_decompositions_in_a_group_keep_previous(name, monkeypatch):
    """Every `eigh` of the group fails (NaN): roots and bases stay the identity they
    started from and no member's parameters become NaN."""
    monkeypatch.setattr(blocks, "_eigh", lambda x: (jnp.full(x.shape[:-1], jnp.nan),
                                                    jnp.full(x.shape, jnp.nan)))
    params, grad = problem()

    def member(lr):
        o = MAKERS[name](lr, 0.9, 0.99, 1e-6)

        def body(carry, t):
            p, s = carry
            u, s = o.update(grad(p, t.astype(jnp.float32)), s, p, step=t)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (params, o.init(params)), jnp.arange(8))[0]

    p, state = jax.jit(jax.vmap(member))(jnp.asarray(LRS, jnp.float32))
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(p))
    kept = state[0].roots if name == "shampoo" else state[0].bases
    for leaf in jax.tree.leaves(kept):
        np.testing.assert_array_equal(leaf, np.broadcast_to(np.eye(leaf.shape[-1]),
                                                            leaf.shape))
