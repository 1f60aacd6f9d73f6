"""Models in Flax NNX, exposed to the rest of Basin as pure functions of parameters."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from experiments.state import batch_stats, has_batch_norm, population_statistics, pure

__all__ = ["CNN1D", "MLP", "ResNet1D", "Transformer1D", "batch_stats", "has_batch_norm",
           "population_statistics", "pure"]

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

    `batch_norm=True` puts a BatchNorm between each convolution (then without bias,
    which the normalization would cancel) and its activation. Such a model has state
    (running statistics): turn it into a function with `pure(model, mode="train")` or
    `pure(model, mode="eval")`.

    Example:
      >>> model = CNN1D(num_classes=10, channels=(16, 32, 32), rngs=nnx.Rngs(0))
      >>> model(x).shape   # x: (N, 40) -> (N, 10)
      >>> bn = CNN1D(10, batch_norm=True, rngs=nnx.Rngs(0))
      >>> train_fn, params = pure(bn, mode="train")
    """

    def __init__(self, num_classes: int, channels: Sequence[int] = (16, 32, 32), *,
                 kernel_size: int = 5, in_channels: int = 1, activation: str = "relu",
                 batch_norm: bool = False, rngs: nnx.Rngs):
        if not channels or any(int(c) < 1 for c in channels):
            raise ValueError(f"`channels` must list positive widths; got {channels}.")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"`activation` must be one of {sorted(_ACTIVATIONS)}; "
                             f"got {activation!r}.")
        self.activation = activation
        widths = (in_channels, *channels)
        self.batch_norm = bool(batch_norm)
        self.convs = nnx.List([nnx.Conv(a, b, (kernel_size,), strides=1 if i == 0 else 2,
                                        use_bias=not self.batch_norm, rngs=rngs)
                               for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))])
        self.norms = nnx.List([nnx.BatchNorm(c, rngs=rngs) for c in channels]
                              if self.batch_norm else [])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.activation]
        x = _as_signal(x)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.batch_norm:
                x = self.norms[i](x)
            x = act(x)
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


class _Block(nnx.Module):
    """Pre-LayerNorm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, dropout: float, *,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        # Plain dense projections (not nnx.MultiHeadAttention's rank-3 kernels) so that
        # K-FAC's layer finder sees every weight matrix of the block.
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

    def _drop(self, x):
        return x if self.dropout is None else self.dropout(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, d = x.shape
        h = self.num_heads
        q, k, v = jnp.split(self.qkv(self.norm1(x)), 3, axis=-1)
        q, k, v = (a.reshape(n, t, h, d // h) for a in (q, k, v))
        scores = jnp.einsum("nthd,nshd->nhts", q, k) / jnp.sqrt(d // h).astype(x.dtype)
        att = jnp.einsum("nhts,nshd->nthd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self._drop(self.proj(att.reshape(n, t, d)))
        return x + self._drop(self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)))))


class Transformer1D(nnx.Module):
    """A small vision-transformer-style classifier for 1-D signals (MNIST-1D).

    The signal of `length` samples is cut into `length // patch_size` patches, each
    embedded linearly as a token, plus a learned position embedding; `depth`
    pre-LayerNorm blocks of multi-head self-attention (`num_heads` heads) and a GELU
    MLP (`mlp_ratio * dim` hidden units); a final LayerNorm, the mean over tokens and a
    linear head. The default size (dim 128, depth 2) has about 400 000 parameters.
    `dropout` (off by default) applies to each residual branch; with it on, the model
    needs `pure(model, mode="train", dropout=True)` and a key per call.

    Example:
      >>> model = Transformer1D(10, rngs=nnx.Rngs(0))
      >>> apply_fn, params = pure(model)
      >>> apply_fn(params, x).shape   # x: (N, 40) -> (N, 10)
    """

    def __init__(self, num_classes: int, *, length: int = 40, patch_size: int = 4,
                 dim: int = 128, depth: int = 2, num_heads: int = 4, mlp_ratio: int = 4,
                 in_channels: int = 1, dropout: float = 0.0, rngs: nnx.Rngs):
        for name, value in (("length", length), ("patch_size", patch_size), ("dim", dim),
                            ("depth", depth), ("num_heads", num_heads),
                            ("mlp_ratio", mlp_ratio)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
        if length % patch_size:
            raise ValueError(f"`patch_size` must divide `length` ({length}); "
                             f"got {patch_size}.")
        if dim % num_heads:
            raise ValueError(f"`num_heads` must divide `dim` ({dim}); got {num_heads}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
        self.patch_size = patch_size
        self.embed = nnx.Linear(patch_size * in_channels, dim, rngs=rngs)
        self.position = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (length // patch_size, dim)))
        self.blocks = nnx.List([_Block(dim, num_heads, mlp_ratio * dim, dropout, rngs=rngs)
                                for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _as_signal(x)
        n, length, c = x.shape
        tokens = x.reshape(n, length // self.patch_size, self.patch_size * c)
        x = self.embed(tokens) + self.position[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(axis=-2))


# ------------------------------------------------------------ pure functions ---
#
