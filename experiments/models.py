"""Models in Flax NNX, exposed to the rest of Basin as pure functions of parameters."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
from flax import nnx

_ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jax.nn.tanh, "gelu": jax.nn.gelu,
                "linear": lambda x: x}


class MLP(nnx.Module):
    """Fully connected network `sizes[0] → … → sizes[-1]` with one activation between layers.

    Example:
      >>> model = MLP((40, 256, 256, 10), rngs=nnx.Rngs(0))
      >>> apply_fn, params = pure(model)
      >>> logits = apply_fn(params, x)
    """

    def __init__(self, sizes: Sequence[int], *, activation: str = "relu",
                 rngs: nnx.Rngs):
        if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
            raise ValueError(f"`sizes` must list at least two positive widths; got {sizes}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; "
                             f"got {activation!r}.")
        self.activation = activation
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        for layer in self.layers[:-1]:
            x = act(layer(x))
        return self.layers[-1](x)


def pure(model: nnx.Module) -> tuple[Callable[[Any, Any], Any], Any]:
    """`(apply_fn, params)` with `apply_fn(params, inputs) = model(inputs)`.

    `params` is a plain nested dict of arrays (`nnx.to_pure_dict`), what optax and every
    `landscape` function expect. The graph definition and any non-parameter state stay
    static inside `apply_fn`, so every JAX transformation sees `params` alone.
    """
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(params, inputs):
        filled = jax.tree.map(lambda a: a, state)  # a fresh container to fill
        nnx.replace_by_pure_dict(filled, params)
        return nnx.merge(graphdef, filled, rest)(inputs)

    return apply_fn, nnx.to_pure_dict(state)
