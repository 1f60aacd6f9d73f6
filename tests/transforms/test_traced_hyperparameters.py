"""`tx.make` of Shampoo, SOAP and K-FAC with the learning rate, betas and damping traced:
one program vmapped over a grid of them equals each grid point built from Python floats
and run alone (through `train_step`, the way the runner drives every optimizer)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import transforms as tx
from tests.landscape import models as m

STEPS, PERIOD = 5, 2
GRIDS = {   # two members each; every swept hyper-parameter differs between them
    "shampoo": {"learning_rate": [0.01, 0.03], "b1": [0.9, 0.5], "b2": [0.99, 0.9],
                "eps": [1e-6, 1e-3]},
    "soap": {"learning_rate": [0.01, 0.03], "b1": [0.9, 0.5], "b2": [0.99, 0.9],
             "eps": [1e-8, 1e-4], "shampoo_b2": [0.95, 0.8]},
    "kfac": {"learning_rate": [0.05, 0.2], "damping": [1e-2, 1e-1], "decay": [0.95, 0.8],
             "momentum": [0.5, 0.9]},
}
FIXED = {"shampoo": {"block_size": 4, "precondition_every": PERIOD,
                     "start_preconditioning_step": 1},
         "soap": {"block_size": 4, "precondition_every": PERIOD},
         "kfac": {"inverse_every": PERIOD}}


def _train(name, hyper, params, batch, layers):
    extra = {"layers": layers} if name == "kfac" else {}
    opt = tx.make(name, **hyper, **FIXED[name], **extra)

    def body(carry, t):
        p, s = carry
        p, s, _ = tx.train_step(opt, m.ce_loss, p, s, batch, jax.random.key(7),
                                apply_fn=m.mlp_apply, step=t)
        return (p, s), None

    return jax.lax.scan(body, (params, opt.init(params)), jnp.arange(STEPS))[0][0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(GRIDS))
def test_a_vmapped_grid_of_traced_hyperparameters_equals_each_point_alone(name):
    params = m.mlp_params(jax.random.key(0), sizes=(5, 6, 3))
    batch = m.classification_data(jax.random.key(1), n=24)
    layers = tx.find_dense_layers(m.mlp_apply, params, batch[0][:1])
    grid = {k: jnp.asarray(v, jnp.float32) for k, v in GRIDS[name].items()}
    together = jax.jit(jax.vmap(lambda h: _train(name, h, params, batch, layers)))(grid)
    for i in range(2):
        point = {k: v[i] for k, v in GRIDS[name].items()}   # Python floats
        alone = jax.jit(lambda: _train(name, point, params, batch, layers))()
        for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
            np.testing.assert_allclose(a[i], b, rtol=2e-5, atol=2e-6)
