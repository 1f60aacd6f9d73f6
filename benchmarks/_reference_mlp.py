"""The reference problem of the curvature-at-scale benchmarks, in plain JAX.

MLP 40→256→256→10 (ReLU, 78 858 float32 parameters) on the 4 000 MNIST-1D training
examples, briefly trained: PyTorch-style uniform initialization (seed 0), then
`TRAIN_STEPS` steps of plain SGD (learning rate 0.1, minibatches of 128 drawn with
seed 0), so the Hessian is that of a network in training rather than at
initialization.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import landscape as ls

SIZES = (40, 256, 256, 10)
TRAIN_STEPS = 500
LEARNING_RATE = 0.1
MINIBATCH = 128


def data() -> tuple[np.ndarray, np.ndarray]:
    import mnist1d

    d = mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())
    return d["x"].astype(np.float32), d["y"].astype(np.int32)


def apply_fn(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(params, batch):
    return ls.cross_entropy(apply_fn(params, batch[0]), batch[1])


def init(seed: int = 0):
    rng = np.random.default_rng(seed)
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        bound = 1.0 / np.sqrt(fan_in)
        params.append({"w": jnp.asarray(rng.uniform(-bound, bound, (fan_in, fan_out)),
                                        jnp.float32),
                       "b": jnp.asarray(rng.uniform(-bound, bound, fan_out), jnp.float32)})
    return params


def trained(x, y, steps: int = TRAIN_STEPS):
    """`init()` after `steps` SGD steps; returns (params, final full-data loss)."""
    idx = np.random.default_rng(0).integers(0, x.shape[0], (steps, MINIBATCH))
    xs, ys = jnp.asarray(x[idx]), jnp.asarray(y[idx])

    @jax.jit
    def run(params):
        def step(p, b):
            g = jax.grad(loss_fn)(p, b)
            return jax.tree.map(lambda a, d: a - LEARNING_RATE * d, p, g), None

        return jax.lax.scan(step, params, (xs, ys))[0]

    params = run(init())
    return params, float(loss_fn(params, (jnp.asarray(x), jnp.asarray(y))))
