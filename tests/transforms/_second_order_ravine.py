"""The ravine shared by the Shampoo, SOAP and K-FAC tests: least squares with condition 10³.

A linear model `x @ W` (W: 20 × 10) on inputs whose covariance has eigenvalues
log-spaced over [1e-3, 1] in a random basis, so the Hessian of the mean loss
½‖xW − y‖² is Σ ⊗ I with condition number exactly 10³ and the minimum is 0.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

D_IN, D_OUT, N = 20, 10, 64
TARGET = 1e-6


def problem():
    rng = np.random.default_rng(0)
    spectrum = np.logspace(-3, 0, D_IN)
    basis, _ = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))
    frame, _ = np.linalg.qr(rng.normal(size=(N, D_IN)))        # orthonormal columns
    x = np.sqrt(N) * frame @ np.diag(np.sqrt(spectrum)) @ basis.T  # xᵀx / N = Σ
    w_star = rng.normal(size=(D_IN, D_OUT))
    w0 = w_star + rng.normal(size=(D_IN, D_OUT))
    return jnp.asarray(x), jnp.asarray(x @ w_star), {"w": jnp.asarray(w0)}


def apply_fn(params, x):
    return x @ params["w"]


def loss_fn(params, batch):
    x, y = batch
    return 0.5 * jnp.mean(jnp.sum((apply_fn(params, x) - y) ** 2, axis=-1))


def steps_to_target(opt, num_steps, extra_args=None):
    """First step after which the loss is below TARGET (num_steps + 1 if never)."""
    x, y, params = problem()

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss_fn)(p, (x, y))
        kwargs = extra_args(p, x) if extra_args is not None else {}
        u, s = opt.update(g, s, p, **kwargs)
        p = optax.apply_updates(p, u)
        return (p, s), loss_fn(p, (x, y))

    _, losses = jax.lax.scan(step, (params, opt.init(params)), None, length=num_steps)
    hit = losses < TARGET
    return jnp.where(hit.any(), jnp.argmax(hit) + 1, num_steps + 1)


def best_steps(make_opt, learning_rates, num_steps):
    """The fewest steps to TARGET over a grid of learning rates (one vmapped program)."""
    run = jax.jit(jax.vmap(lambda lr: steps_to_target(make_opt(lr), num_steps)))
    return int(jnp.min(run(jnp.asarray(learning_rates))))


@functools.lru_cache(maxsize=None)   # shared by the three test modules in one session
def baselines(num_steps=20_000):
    """Steps for SGD and Adam with the best learning rate on a log grid."""
    sgd = best_steps(optax.sgd, np.geomspace(0.05, 2.0, 12), num_steps)
    adam = best_steps(optax.adam, np.geomspace(1e-3, 0.3, 12), num_steps)
    return sgd, adam
