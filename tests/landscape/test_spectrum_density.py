"""Density with probes in blocks: the same quadrature as one probe at a time."""

import jax
import numpy as np
import pytest

import landscape as ls
from tests.landscape import models as m

KEY = jax.random.key(0)


@pytest.mark.parametrize("block_size", [2, pytest.param(3, marks=pytest.mark.slow),
                                        pytest.param(7, marks=pytest.mark.slow)])
def test_blocked_density_equals_one_probe_at_a_time(block_size):
    params = m.mlp_params(jax.random.key(1), sizes=(4, 8, 3))
    batch = m.classification_data(jax.random.key(2), n=32, d=4, classes=3)
    op = ls.hessian(m.ce_loss, params, batch)
    one = ls.density(op, key=KEY, num_probes=7, num_steps=12, block_size=1)
    blocked = ls.density(op, key=KEY, num_probes=7, num_steps=12, block_size=block_size)
    np.testing.assert_allclose(blocked.nodes, one.nodes, atol=1e-10)
    np.testing.assert_allclose(blocked.weights, one.weights, atol=1e-10)
    np.testing.assert_allclose(blocked.values, one.values, rtol=1e-10, atol=1e-10)
    # and both are the quadrature of the dense Hessian: moment 1 is tr(H)/n per probe
    dense = np.asarray(m.dense_hessian(m.ce_loss, params, batch))
    est, err = blocked.moments(1)
    assert abs(float(est) - np.trace(dense) / dense.shape[0]) < 5 * float(err)


def test_bad_block_size():
    op = ls.LinearOperator(lambda v: 2.0 * v, np.zeros(5))
    with pytest.raises(ValueError, match="block_size"):
        ls.density(op, key=KEY, num_steps=3, block_size=0)
