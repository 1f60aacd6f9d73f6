"""A decoder-only transformer in plain JAX (GPT-2 layout: pre-norm blocks, learned
positions, tied input/output embedding), for the parameter-sharded curvature checks.

`Config(...)` sizes it; `init(key, cfg)` gives the parameter pytree, `loss_fn(cfg)` the
mean next-token cross-entropy `loss(params, tokens)` on a `(batch, seq + 1)` int array,
`tokens(key, cfg, n)` synthetic token data. GPT-2 small: `Config()` (124M parameters);
`Config.gpt_1b()` a 1.3B configuration (GPT-2 XL-like widths).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Config:
    vocab: int = 50257
    seq: int = 1024
    layers: int = 12
    width: int = 768
    heads: int = 12
    remat: bool = False  # recompute each block's activations in the backward pass

    @staticmethod
    def gpt_1b(**kw) -> "Config":
        return Config(**{"layers": 24, "width": 2048, "heads": 16, **kw})


def num_params(cfg: Config) -> int:
    per_block = 12 * cfg.width ** 2 + 13 * cfg.width
    return cfg.vocab * cfg.width + cfg.seq * cfg.width + cfg.layers * per_block + 2 * cfg.width


def init(key: jax.Array, cfg: Config, dtype=jnp.float32) -> dict:
    d = cfg.width
    keys = iter(jax.random.split(key, 2 + 4 * cfg.layers))

    def normal(shape, scale=0.02):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    proj = 0.02 / math.sqrt(2 * cfg.layers)
    blocks = []
    for _ in range(cfg.layers):
        blocks.append({
            "ln1": {"g": jnp.ones((d,), dtype), "b": jnp.zeros((d,), dtype)},
            "attn": {"qkv": normal((d, 3 * d)), "qkv_b": jnp.zeros((3 * d,), dtype),
                     "out": normal((d, d), proj), "out_b": jnp.zeros((d,), dtype)},
            "ln2": {"g": jnp.ones((d,), dtype), "b": jnp.zeros((d,), dtype)},
            "mlp": {"up": normal((d, 4 * d)), "up_b": jnp.zeros((4 * d,), dtype),
                    "down": normal((4 * d, d), proj), "down_b": jnp.zeros((d,), dtype)},
        })
    return {"embed": normal((cfg.vocab, d)), "pos": normal((cfg.seq, d), 0.01),
            "blocks": blocks,
            "ln_f": {"g": jnp.ones((d,), dtype), "b": jnp.zeros((d,), dtype)}}


def _norm(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _block(cfg: Config, x, p):
    b, t, d = x.shape
    h = cfg.heads
    qkv = _norm(x, p["ln1"]) @ p["attn"]["qkv"] + p["attn"]["qkv_b"]
    q, k, v = (a.reshape(b, t, h, d // h) for a in jnp.split(qkv, 3, axis=-1))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d // h)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, att, -1e9), axis=-1)
    y = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + y @ p["attn"]["out"] + p["attn"]["out_b"]
    m = jax.nn.gelu(_norm(x, p["ln2"]) @ p["mlp"]["up"] + p["mlp"]["up_b"])
    return x + m @ p["mlp"]["down"] + p["mlp"]["down_b"]


def logits(cfg: Config, params, inputs):
    t = inputs.shape[1]
    x = params["embed"][inputs] + params["pos"][:t]
    block = jax.checkpoint(_block, static_argnums=0) if cfg.remat else _block
    for p in params["blocks"]:
        x = block(cfg, x, p)
    return _norm(x, params["ln_f"]) @ params["embed"].T


def loss_fn(cfg: Config):
    def loss(params, tokens):
        z = logits(cfg, params, tokens[:, :-1])
        logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
        target = tokens[:, 1:]
        return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))
    return loss


def tokens(key: jax.Array, cfg: Config, n: int) -> jax.Array:
    """`(n, seq + 1)` synthetic tokens: a random walk over the vocabulary (so the next
    token is predictable from the last, and the loss has structure)."""
    k1, k2 = jax.random.split(key)
    start = jax.random.randint(k1, (n, 1), 0, cfg.vocab)
    steps = jax.random.randint(k2, (n, cfg.seq), -3, 4)
    return (jnp.cumsum(jnp.concatenate([start, steps], axis=1), axis=1) % cfg.vocab
            ).astype(jnp.int32)
