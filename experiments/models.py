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


def _as_signal(x: jax.Array) -> jax.Array:
    """`(N, length)` signals become `(N, length, 1)`: one input channel."""
    return x[..., None] if x.ndim == 2 else x


class CNN1D(nnx.Module):
    """1-D convolutions (same padding, stride 2 after the first) then global average and a
    linear read-out: `channels[i]` filters of width `kernel_size` in layer i.

    Example:
      >>> model = CNN1D(num_classes=10, channels=(16, 32, 32), rngs=nnx.Rngs(0))
      >>> model(x).shape   # x: (N, 40) -> (N, 10)
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 32), *,
                 kernel_size: int = 5, in_channels: int = 1, activation: str = "relu",
                 rngs: nnx.Rngs):
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"`channels` must list positive widths; got {channels}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; "
                             f"got {activation!r}.")
        self.activation = activation
        widths = (in_channels, *channels)
        self.convs = nnx.List([nnx.Conv(a, b, (kernel_size,), strides=1 if i == 0 else 2,
                                        rngs=rngs)
                               for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        x = _as_signal(x)
        for conv in self.convs:
            x = act(conv(x))
        return self.head(x.mean(axis=-2))


class ResNet1D(nnx.Module):
    """A 1-D residual network: a stem convolution, `depth` blocks of two convolutions with
    an identity skip (`skip=False` removes every skip, giving the plain network of the
    same depth, as in Li et al. 2018), global average and a linear read-out.

    Example:
      >>> plain = ResNet1D(10, depth=8, skip=False, rngs=nnx.Rngs(0))
    """

    def __init__(self, num_classes: int, *, width: int = 16, depth: int = 4,
                 kernel_size: int = 5, in_channels: int = 1, skip: bool = True,
                 rngs: nnx.Rngs):
        if width < 1 or depth < 1:
            raise ValueError(f"`width` and `depth` must be positive; got {width}, {depth}.")
        self.skip = bool(skip)
        self.stem = nnx.Conv(in_channels, width, (kernel_size,), rngs=rngs)
        self.blocks = nnx.List([
            nnx.List([nnx.Conv(width, width, (kernel_size,), rngs=rngs),
                      nnx.Conv(width, width, (kernel_size,), rngs=rngs)])
            for _ in range(depth)])
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.stem(_as_signal(x)))
        for first, second in self.blocks:
            h = second(jax.nn.relu(first(x)))
            x = jax.nn.relu(h + x if self.skip else h)
        return self.head(x.mean(axis=-2))


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
