"""Tiny models shared by the landscape tests (float64, under 300 parameters)."""

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

import landscape as ls


def mlp_params(key, sizes=(5, 8, 3)):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, k = jax.random.split(key)
        params[f"layer{i}"] = {"w": jax.random.normal(k, (a, b)) / jnp.sqrt(a),
                               "b": 0.1 * jnp.ones(b)}
    return params


def mlp_apply(params, x):
    layers = [params[k] for k in sorted(params)]
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def classification_data(key, n=37, d=5, classes=3):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, d)), jax.random.randint(ky, (n,), 0, classes)


def ce_loss(params, batch):
    return ls.cross_entropy(mlp_apply(params, batch[0]), batch[1])


def mse_loss(params, batch):
    return ls.mse(mlp_apply(params, batch[0]), batch[1])


def dense_hessian(loss_fn, params, batch):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)


def flat_jacobian(params, x):
    """(N, outputs, P): Jacobian of each example's outputs with respect to the flat params."""
    flat, unravel = ravel_pytree(params)
    return jax.vmap(lambda xi: jax.jacobian(lambda f: mlp_apply(unravel(f), xi[None])[0])(flat))(x)
