"""Curvature operators against dense references on tiny float64 models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def setup():
    params = m.mlp_params(jax.random.key(1))
    x, y = m.classification_data(jax.random.key(2))
    assert ravel_pytree(params)[0].size <= 300
    return params, (x, y)


def _random_like(params, seed=3):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape))


@pytest.mark.parametrize("chunk_size", [None, 10, 37, 64])
def test_hessian_matvec_equals_dense_hessian(setup, chunk_size):
    params, batch = setup
    dense = m.dense_hessian(m.ce_loss, params, batch)
    op = ls.hessian(m.ce_loss, params, batch, chunk_size=chunk_size)
    v = _random_like(params)
    got = ravel_pytree(op.matvec(v))[0]
    np.testing.assert_allclose(got, dense @ ravel_pytree(v)[0], atol=1e-10)
    np.testing.assert_allclose(op.dense(), dense, atol=1e-10)


def _softmax_hessians(logits):
    p = jax.nn.softmax(logits)
    return jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_equals_explicit_jt_h_j(setup, loss):
    params, (x, y) = setup
    if loss == "mse":
        y = jax.random.normal(jax.random.key(5), (x.shape[0], 3))
    jac = m.flat_jacobian(params, x)  # (N, C, P)
    if loss == "cross_entropy":
        h_out = _softmax_hessians(m.mlp_apply(params, x))
    else:
        h_out = jnp.broadcast_to(jnp.eye(3), (x.shape[0], 3, 3))
    explicit = jnp.einsum("nap,nab,nbq->pq", jac, h_out, jac) / x.shape[0]
    op = ls.ggn(m.mlp_apply, params, (x, y), loss=loss, chunk_size=10)
    np.testing.assert_allclose(op.dense(), explicit, atol=1e-10)


def test_ggn_with_callable_loss_equals_builtin(setup):
    params, batch = setup

    def per_example_ce(logits, label):
        return -jax.nn.log_softmax(logits)[label]

    v = _random_like(params)
    a = ls.ggn(m.mlp_apply, params, batch, loss=per_example_ce).matvec(v)
    b = ls.ggn(m.mlp_apply, params, batch, loss="cross_entropy").matvec(v)
    np.testing.assert_allclose(ravel_pytree(a)[0], ravel_pytree(b)[0], atol=1e-12)


def test_ggn_equals_hessian_for_a_linear_model_with_mse():
    # With outputs linear in the parameters, the Hessian is exactly the GGN.
    x = jax.random.normal(jax.random.key(0), (20, 4))
    y = jax.random.normal(jax.random.key(1), (20, 2))
    params = {"w": jax.random.normal(jax.random.key(2), (4, 2)), "b": jnp.zeros(2)}
    apply = lambda p, x: x @ p["w"] + p["b"]  # noqa: E731
    loss = lambda p, b: ls.mse(apply(p, b[0]), b[1])  # noqa: E731
    np.testing.assert_allclose(ls.ggn(apply, params, (x, y), loss="mse").dense(),
                               ls.hessian(loss, params, (x, y)).dense(), atol=1e-12)


def test_ggn_is_positive_semidefinite(setup):
    params, batch = setup
    assert np.linalg.eigvalsh(ls.ggn(m.mlp_apply, params, batch).dense()).min() > -1e-12


def test_empirical_fisher_equals_mean_of_gradient_outer_products(setup):
    params, batch = setup
    grads = ls.per_example_grads(m.ce_loss, params, batch)
    g = jax.vmap(lambda t: ravel_pytree(t)[0])(grads)
    explicit = g.T @ g / g.shape[0]
    op = ls.fisher(m.mlp_apply, params, batch, kind="empirical", chunk_size=8)
    np.testing.assert_allclose(op.dense(), explicit, atol=1e-10)


@pytest.mark.slow
def test_per_example_grads_equal_single_example_gradients(setup):
    params, (x, y) = setup
    grads = ls.per_example_grads(m.ce_loss, params, (x, y), chunk_size=5)
    for i in (0, 17, 36):
        one = jax.grad(m.ce_loss)(params, (x[i:i + 1], y[i:i + 1]))
        np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda a: a[i], grads))[0],
                                   ravel_pytree(one)[0], atol=1e-12)


def test_true_fisher_matches_explicit_sampled_labels(setup):
    # The sampled operator is a fixed matrix: rebuild it from the same samples.
    params, (x, y) = setup
    key = jax.random.key(11)
    op = ls.fisher(m.mlp_apply, params, (x, y), kind="true", key=key)
    logits = m.mlp_apply(params, x)
    sampled = jax.random.categorical(jax.random.split(jax.random.fold_in(key, 0), 1)[0],
                                     logits, axis=-1)
    grads = ls.per_example_grads(m.ce_loss, params, (x, sampled))
    g = jax.vmap(lambda t: ravel_pytree(t)[0])(grads)
    np.testing.assert_allclose(op.dense(), g.T @ g / g.shape[0], atol=1e-10)


def test_true_fisher_averages_to_the_ggn(setup):
    # For cross-entropy, E_{y~p}[g gᵀ] = Jᵀ (diag p − p pᵀ) J exactly; with S samples the
    # difference shrinks like 1/√S.
    params, batch = setup
    ggn = ls.ggn(m.mlp_apply, params, batch).dense()
    errs = []
    for s in (16, 1024):
        fisher = ls.fisher(m.mlp_apply, params, batch, kind="true", num_samples=s,
                           key=jax.random.key(4)).dense()
        errs.append(float(jnp.linalg.norm(fisher - ggn) / jnp.linalg.norm(ggn)))
    assert errs[1] < 0.1
    assert errs[1] < errs[0] / 3


def test_matmat_is_matvec_per_column(setup):
    params, batch = setup
    op = ls.hessian(m.ce_loss, params, batch)
    vs = jax.tree.map(lambda *a: jnp.stack(a), *[_random_like(params, s) for s in range(3)])
    out = op.matmat(vs)
    for i in range(3):
        one = op.matvec(jax.tree.map(lambda a: a[i], vs))
        np.testing.assert_allclose(ravel_pytree(jax.tree.map(lambda a: a[i], out))[0],
                                   ravel_pytree(one)[0], atol=1e-12)


@pytest.mark.slow
def test_operator_passes_through_jit(setup):
    params, batch = setup
    v = _random_like(params)

    @jax.jit
    def f(op, v):
        return op.matvec(v)

    op = ls.hessian(m.ce_loss, params, batch, chunk_size=9)
    np.testing.assert_allclose(ravel_pytree(f(op, v))[0], ravel_pytree(op.matvec(v))[0],
                               atol=1e-12)


# ------------------------------------------------------------------ bad input ---

def test_wrong_tree_structure_is_rejected(setup):
    params, batch = setup
    op = ls.hessian(m.ce_loss, params, batch)
    with pytest.raises(ValueError, match="tree structure"):
        op.matvec({"layer0": params["layer0"]})
    bad = jax.tree.map(lambda a: a, params)
    bad["layer0"] = {"w": jnp.zeros((2, 2)), "b": params["layer0"]["b"]}
    with pytest.raises(ValueError, match="shape"):
        op.matvec(bad)


def test_non_scalar_loss_is_rejected(setup):
    params, batch = setup
    with pytest.raises(ValueError, match="scalar"):
        ls.hessian(lambda p, b: m.mlp_apply(p, b[0]).sum(1), params, batch)


def test_bad_arguments_are_named(setup):
    params, batch = setup
    with pytest.raises(ValueError, match="loss"):
        ls.ggn(m.mlp_apply, params, batch, loss="hinge")
    with pytest.raises(ValueError, match="kind"):
        ls.fisher(m.mlp_apply, params, batch, kind="observed")
    with pytest.raises(ValueError, match="key"):
        ls.fisher(m.mlp_apply, params, batch, kind="true")
    with pytest.raises(ValueError, match="chunk_size"):
        ls.hessian(m.ce_loss, params, batch, chunk_size=0)
    with pytest.raises(ValueError, match="inputs, targets"):
        ls.ggn(m.mlp_apply, params, batch[0])
    with pytest.raises(ValueError, match="leading example axis"):
        ls.hessian(m.ce_loss, params, (batch[0], batch[1][:5]))


def test_integer_parameters_are_rejected_at_construction(setup):
    params, batch = setup
    ints = jax.tree.map(lambda a: jnp.round(a).astype(jnp.int32), params)
    mixed = dict(params, step=jnp.asarray(3))  # one integer leaf among floats
    apply_fn = lambda p, x: m.mlp_apply({k: v for k, v in p.items() if k != "step"}, x)
    loss_fn = lambda p, b: ls.cross_entropy(apply_fn(p, b[0]), b[1])
    builders = [lambda p: ls.hessian(loss_fn, p, batch),
                lambda p: ls.ggn(apply_fn, p, batch),
                lambda p: ls.fisher(apply_fn, p, batch, kind="empirical"),
                lambda p: ls.fisher(apply_fn, p, batch, kind="true", key=KEY)]
    for build in builders:
        for bad in (ints, mixed):
            with pytest.raises(ValueError, match="floating-point"):
                build(bad)
    with pytest.raises(ValueError, match="floating-point.*step"):
        ls.eigenvalues(ls.hessian(loss_fn, mixed, batch), k=1, key=KEY)
