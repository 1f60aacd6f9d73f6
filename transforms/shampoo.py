"""Shampoo: Kronecker-factored preconditioning of each parameter tensor.

Gupta, Koren & Singer (2018), "Shampoo: Preconditioned Stochastic Tensor Optimization",
in the blocked and grafted form of Anil, Gupta, Koren, Regan & Singer (2020), "Scalable
Second Order Optimization for Deep Learning".

For a matrix parameter with gradient G, Shampoo keeps the statistics L = Σ G Gᵀ and
R = Σ Gᵀ G and steps along L^(-1/4) G R^(-1/4); a tensor of rank k keeps one statistic
per dimension and uses the power -1/(2k) on each.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from landscape import _validate as check
from transforms import _second_order_blocks as blocks

_GRAFTS = ("adam", "sgd", "none")


class ShampooState(NamedTuple):
    """State of `scale_by_shampoo`.

    `stats` and `roots` hold, for each parameter leaf in `jax.tree.leaves` order, a
    tuple with one `(num_blocks, b_i, b_i)` array per preconditioned dimension, or an
    empty tuple for leaves that fall back to the graft (vectors and scalars).
    """

    count: jax.Array   # steps taken (int32)
    mu: Any            # first moment of the gradient (pytree like params)
    nu: Any            # graft's second moment (pytree like params; () unless graft="adam")
    stats: tuple
    roots: tuple


def _moment_weights(decay_rate):
    """(old weight, new weight) of an EMA; decay 1 means plain sums."""
    return decay_rate, jnp.where(decay_rate == 1.0, 1.0, 1.0 - decay_rate)


def _bias_correction(decay_rate, n: jax.Array, dtype) -> jax.Array:
    """1 − decay^n in `dtype`, 1 for plain sums. (n is cast first: computed in float32
    under x64, the step was off by √((1 − float32(b2)) / (1 − b2)).)"""
    n = n.astype(dtype)
    return jnp.where(decay_rate == 1.0, jnp.ones_like(n), 1.0 - decay_rate ** n)


def _graft_direction(graft, updates, mu_hat, nu, b2, graft_eps, t_inc):
    """(graft direction, new nu): Adam's m̂/(√v̂ + ε) (AdaGrad's when b2 = 1) or m̂."""
    if graft != "adam":
        return mu_hat, nu
    old_w, new_w = _moment_weights(b2)
    nu = jax.tree.map(lambda v, g: old_w * v + new_w * (g * jnp.conj(g)).real, nu, updates)
    return jax.tree.map(
        lambda m, v: m / (jnp.sqrt(v / _bias_correction(b2, t_inc, v.dtype)) + graft_eps),
        mu_hat, nu), nu


def _refresh_roots(plans, stats, roots, corr, eps, exponent):
    """New inverse roots of every preconditioned leaf, the decompositions in sequence."""
    new, token = [], None
    for pl, st, rt in zip(plans, stats, roots):
        if not pl.preconditioned:
            new.append(())
            continue
        p = exponent if exponent is not None else 2.0 * pl.rank
        out = []
        for si, ri in zip(st, rt):
            si = blocks.after(si / corr.astype(si.dtype), token)
            out.append(blocks.inverse_root(si, p, eps, ri))
            token = out[-1]
        new.append(tuple(out))
    return tuple(new)


def _precondition(pl, m, roots, graft_dir, graft, active):
    db = blocks.to_blocks(m, pl)
    for i, ri in enumerate(roots):
        db = blocks.mode_product(db, ri, i)
    d = blocks.from_blocks(db, pl)
    if graft != "none":
        dn, gn = jnp.linalg.norm(d), jnp.linalg.norm(graft_dir)
        d = d * jnp.where(dn > 0, gn / jnp.where(dn > 0, dn, 1.0), 0.0)
    return jnp.where(active & jnp.all(jnp.isfinite(d)), d, graft_dir)


def _shampoo_update(hp, updates, state, step):
    """One Shampoo step; `hp` holds the builder's checked settings."""
    t, refresh = blocks.schedule(state.count, step, hp["start"], hp["precondition_every"])
    t_inc = t + 1
    mu = optax.tree.update_moment(updates, state.mu, hp["b1"], 1)
    mu_hat = jax.tree.map(lambda m: m / _bias_correction(hp["b1"], t_inc, m.dtype), mu)
    graft_dir, nu = _graft_direction(hp["graft"], updates, mu_hat, state.nu, hp["b2"],
                                     hp["graft_eps"], t_inc)

    leaves_g, treedef = jax.tree.flatten(updates)
    plans = [blocks.make_plan(jnp.shape(g), hp["block_size"]) for g in leaves_g]
    old_w, new_w = _moment_weights(hp["b2"])

    def accumulate(stats):
        return tuple(() if not pl.preconditioned else tuple(
            old_w * si + new_w * blocks.mode_statistic(blocks.to_blocks(g, pl), i)
            for i, si in enumerate(st)) for pl, g, st in zip(plans, leaves_g, stats))

    if hp["stats_every"] == 1:   # no cond: its pass-through branch copies every statistic
        stats = accumulate(state.stats)
    else:
        stats = jax.lax.cond(t % hp["stats_every"] == 0, accumulate, lambda s: s,
                             state.stats)
    dtype = jnp.result_type(*leaves_g) if leaves_g else jnp.float32
    corr = _bias_correction(hp["b2"], t // hp["stats_every"] + 1, dtype)
    roots = jax.lax.cond(
        refresh,
        lambda s, r: _refresh_roots(plans, s, r, corr, hp["eps"], hp["exponent"]),
        lambda s, r: r, stats, state.roots)
    out = [gr if not pl.preconditioned else
           _precondition(pl, m, rt, gr, hp["graft"], t >= hp["start"])
           for pl, m, gr, rt in zip(plans, treedef.flatten_up_to(mu_hat),
                                    treedef.flatten_up_to(graft_dir), roots)]
    new_state = ShampooState(optax.safe_increment(state.count), mu, nu, stats, roots)
    return treedef.unflatten(out), new_state


def scale_by_shampoo(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    *,
    block_size: int = 1024,
    precondition_every: int = 10,
    stats_every: int = 1,
    start_preconditioning_step: int = 10,
    graft: str = "adam",
    graft_eps: float = 1e-8,
    exponent: float | None = None,
) -> optax.GradientTransformation:
    """Rescale updates by blocked, grafted Shampoo (no learning rate; see `shampoo`).

    Per step, with the gradient G of one parameter and t the step number:

    1. m ← b1 m + (1 − b1) G, with Adam's bias correction (b1 = 0: m = G).
    2. Every `stats_every` steps, for each dimension i of each block, the statistic
       S_i ← b2 S_i + (1 − b2) G_(i) G_(i)ᵀ (b2 = 1: plain sums, as in the original
       Shampoo); G_(i) is the mode-i unfolding.
    3. Every `precondition_every` steps from `start_preconditioning_step`, the inverse
       roots P_i = (Ŝ_i + eps I)^(-1/p) from `eigh` (Ŝ the bias-corrected statistic,
       p = 2k for rank k unless `exponent` is given). A block whose decomposition is
       not finite keeps its previous root (the identity before the first success).
    4. Direction D = m ×_1 P_1 ×_2 … ×_k P_k (for a matrix, P_L m P_R), then grafted:
       D · ‖graft‖ / ‖D‖, per parameter, where graft is Adam's direction
       m̂ / (√v̂ + graft_eps) (v the EMA of G² with rate b2) or SGD's m̂. `graft="none"`
       returns D itself. Before `start_preconditioning_step`, and for vectors and
       scalars, the update is the graft's direction, so with the defaults the first
       steps are exactly Adam's.

    Tensors of rank > 2 have adjacent dimensions merged while their product fits in
    `block_size`; dimensions longer than `block_size` are cut into the fewest equal
    blocks of at most `block_size` (zero-padded), each with its own statistics.

    Cost for an (m × n) parameter with blocks of size b (b = min(m, n, block_size)
    when one block): memory O(mn + (m + n)·b) for the moments, statistics and roots;
    compute per step O(mn·b) for the statistics and the preconditioned direction, plus
    O((m + n)·b²) for the `eigh` calls every `precondition_every` steps.

    In a vmapped group (a sweep), pass the global step count as `update(..., step=t)`
    with `t` unbatched (`in_axes=None`, or through `transforms.train_step`'s extra
    arguments): the refresh condition is then computed from `t` rather than from each
    member's own counter, so its `lax.cond` stays a branch and the decompositions run once
    per period for the whole group instead of at every step. `t` must equal the number of
    updates taken before this one (what `state.count` holds). Without `step`, the state's
    counter decides, as in any optax transform. Decompositions run one matrix at a time
    and one after another (batched LAPACK calls deadlocked XLA's CPU thread pool).

    `b1`, `b2`, `eps` and `graft_eps` may be arrays (e.g. traced inside a `vmap` over a
    hyper-parameter grid); they are then not checked here.

    Args:
      b1: momentum decay in [0, 1).
      b2: decay of the statistics and of the Adam graft's second moment, in [0, 1].
      eps: damping ε > 0 added to the statistics before the inverse root.
      block_size: the largest block along any dimension (>= 2).
      precondition_every: steps between refreshes of the inverse roots (>= 1).
      stats_every: steps between updates of the statistics (>= 1).
      start_preconditioning_step: first step (counted from 0) that uses the roots.
      graft: "adam", "sgd" or "none".
      graft_eps: the Adam graft's ε.
      exponent: overrides p in P_i = S_i^(-1/p) (> 0); by default 2·rank.

    Example:
      >>> opt = optax.chain(scale_by_shampoo(), optax.scale_by_learning_rate(1e-3))
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
    """
    hp = dict(
        b1=blocks.checked(check.unit_interval, b1, "b1"),
        b2=blocks.checked(check.closed_unit_interval, b2, "b2"),
        eps=blocks.checked(check.positive, eps, "eps"),
        graft_eps=blocks.checked(check.nonnegative, graft_eps, "graft_eps"),
        block_size=blocks.check_block_size(block_size),
        precondition_every=check.positive_int(precondition_every, "precondition_every"),
        stats_every=check.positive_int(stats_every, "stats_every"),
        start=check.nonnegative_int(start_preconditioning_step,
                                     "start_preconditioning_step"),
        graft=check.choice(graft, "graft", _GRAFTS),
        exponent=None if exponent is None else check.positive(exponent, "exponent"))

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        ps = [blocks.make_plan(jnp.shape(p), hp["block_size"]) for p in leaves]
        stats = tuple(blocks.zero_blocks(pl, p.dtype) if pl.preconditioned else ()
                      for pl, p in zip(ps, leaves))
        roots = tuple(blocks.identity_blocks(pl, p.dtype) if pl.preconditioned else ()
                      for pl, p in zip(ps, leaves))
        nu = optax.tree.zeros_like(params) if hp["graft"] == "adam" else ()
        return ShampooState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), nu,
                            stats, roots)

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        return _shampoo_update(hp, updates, state, step)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    **kwargs,
) -> optax.GradientTransformation:
    """Shampoo with a learning rate: `scale_by_shampoo`, decoupled weight decay (added
    to the scaled update, as in `optax.adamw`; `update` then needs `params`), a descent
    step.

    Keyword arguments (`block_size`, `precondition_every`, `stats_every`,
    `start_preconditioning_step`, `graft`, `graft_eps`, `exponent`) are those of
    `scale_by_shampoo`.

    Example:
      >>> opt = shampoo(learning_rate=1e-3, block_size=512, precondition_every=20)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state)
      >>> params = optax.apply_updates(params, updates)
    """
    weight_decay = blocks.checked(check.nonnegative, weight_decay, "weight_decay")
    return blocks.descent(scale_by_shampoo(b1, b2, eps, **kwargs), learning_rate,
                          weight_decay)
