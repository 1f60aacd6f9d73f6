"""The output-space losses that `ggn` and `fisher` know in closed form.

Each is the *mean* loss over examples, the convention of every `loss_fn` in Basin.
Outputs carry classes / output dimensions on the last axis; any axes between the
example axis and the last (sequence positions, say) are averaged too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; `targets` are integer labels or probabilities."""
    if jnp.issubdtype(targets.dtype, jnp.integer):
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over examples of ½‖outputs − targets‖², summed over the last axis."""
    diff = outputs - targets
    if diff.ndim <= 1:
        return 0.5 * jnp.mean(diff**2)
    return 0.5 * jnp.mean(jnp.sum(diff**2, axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose arg-max logit is the label."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)
