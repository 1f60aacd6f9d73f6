"""Per-block curvature against the blocks of the dense Hessian."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import landscape as ls
from tests.landscape import models as m


@pytest.fixture(scope="module")
def setup():
    params = m.mlp_params(jax.random.key(1), sizes=(5, 8, 3))
    batch = m.classification_data(jax.random.key(2))
    H = ls.hessian(m.ce_loss, params, batch)
    return params, H, np.asarray(m.dense_hessian(m.ce_loss, params, batch))


def _indices(params, select):
    """Flat positions of the selected leaves, in ravel_pytree order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    out, start = [], 0
    for path, leaf in leaves:
        if select(ls.path_name(path), leaf):
            out.extend(range(start, start + leaf.size))
        start += leaf.size
    return np.array(out)


SELECTORS = {
    "first layer": lambda p, leaf: p.startswith("layer0/"),
    "kernels": lambda p, leaf: p.endswith("/w"),
    "one bias": lambda p, leaf: p == "layer1/b",
}


@pytest.mark.parametrize("name", list(SELECTORS))
def test_block_equals_the_dense_hessian_block(setup, name):
    params, H, dense = setup
    block = ls.restrict(H, SELECTORS[name])
    idx = _indices(params, SELECTORS[name])
    np.testing.assert_allclose(block.dense(), dense[np.ix_(idx, idx)], atol=1e-10)
    top = ls.eigenvalues(block, k=1, key=jax.random.key(0), num_steps=block.size)
    np.testing.assert_allclose(top.values[0],
                               np.linalg.eigvalsh(dense[np.ix_(idx, idx)])[-1], rtol=1e-8)


def test_per_block_traces_sum_to_the_full_trace(setup):
    params, H, dense = setup
    blocks = [ls.restrict(H, lambda p, leaf, k=k: p.startswith(k + "/"))
              for k in sorted(params)]
    total = sum(np.trace(b.dense()) for b in blocks)
    np.testing.assert_allclose(total, np.trace(dense), rtol=1e-10)
    assert sum(b.size for b in blocks) == ravel_pytree(params)[0].size


def test_an_empty_selection_is_an_error(setup):
    _, H, _ = setup
    with pytest.raises(ValueError, match="kept no parameter"):
        ls.restrict(H, lambda p, leaf: False)
