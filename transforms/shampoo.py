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

from transforms import _second_order_blocks as blocks
from transforms import _second_order_validate as check

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


def _moment_weights(decay_rate: float):
    """(old weight, new weight) of an EMA; decay 1 means plain sums."""
    return (1.0, 1.0) if decay_rate == 1.0 else (decay_rate, 1.0 - decay_rate)


def _bias_correction(decay_rate: float, t: jax.Array) -> jax.Array:
    if decay_rate == 1.0:
        return jnp.ones_like(t)
    return 1.0 - decay_rate ** t


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
    b1 = check.decay(b1, "b1")
    b2 = check.decay(b2, "b2", allow_one=True)
    eps = check.positive(eps, "eps")
    block_size = blocks.check_block_size(block_size)
    precondition_every = check.positive_int(precondition_every, "precondition_every")
    stats_every = check.positive_int(stats_every, "stats_every")
    start = check.non_negative_int(start_preconditioning_step, "start_preconditioning_step")
    graft = check.choice(graft, "graft", _GRAFTS)
    graft_eps = check.non_negative(graft_eps, "graft_eps")
    if exponent is not None:
        exponent = check.positive(exponent, "exponent")
    old_w, new_w = _moment_weights(b2)

    def plans(params):
        return [blocks.make_plan(jnp.shape(p), block_size) for p in jax.tree.leaves(params)]

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        ps = plans(params)
        stats = tuple(blocks.zero_blocks(pl, p.dtype) if pl.preconditioned else ()
                      for pl, p in zip(ps, leaves))
        roots = tuple(blocks.identity_blocks(pl, p.dtype) if pl.preconditioned else ()
                      for pl, p in zip(ps, leaves))
        nu = optax.tree.zeros_like(params) if graft == "adam" else ()
        return ShampooState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params), nu,
                            stats, roots)

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        count_inc = optax.safe_increment(count)
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        mu_hat = optax.tree.bias_correction(mu, b1, count_inc) if b1 > 0 else mu
        if graft == "adam":
            if b2 == 1.0:  # sums: an AdaGrad graft
                nu = jax.tree.map(lambda v, g: v + g * jnp.conj(g), state.nu, updates)
                nu_hat = nu
            else:
                nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
                nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
            grafted = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + graft_eps),
                                   mu_hat, nu_hat)
        else:
            nu = state.nu
            grafted = mu_hat

        leaves_g, treedef = jax.tree.flatten(updates)
        leaves_m = treedef.flatten_up_to(mu_hat)
        leaves_graft = treedef.flatten_up_to(grafted)
        ps = [blocks.make_plan(jnp.shape(g), block_size) for g in leaves_g]

        do_stats = count % stats_every == 0
        n_stats = (count // stats_every + 1).astype(jnp.float32)
        refresh = (count >= start) & ((count - start) % precondition_every == 0)
        active = count >= start

        new_stats, new_roots, out = [], [], []
        for pl, g, m, gr, st, rt in zip(ps, leaves_g, leaves_m, leaves_graft,
                                        state.stats, state.roots):
            if not pl.preconditioned:
                new_stats.append(())
                new_roots.append(())
                out.append(gr)
                continue
            gb = blocks.to_blocks(g, pl)
            st = jax.lax.cond(
                do_stats,
                lambda s, gb=gb: tuple(old_w * si + new_w * blocks.mode_statistic(gb, i)
                                       for i, si in enumerate(s)),
                lambda s: s, st)
            p = exponent if exponent is not None else 2.0 * pl.rank
            corr = _bias_correction(b2, n_stats)
            rt = jax.lax.cond(
                refresh,
                lambda s, r, p=p: tuple(
                    blocks.inverse_root(si / corr.astype(si.dtype), p, eps, ri)
                    for si, ri in zip(s, r)),
                lambda s, r: r, st, rt)
            db = blocks.to_blocks(m, pl)
            for i, ri in enumerate(rt):
                db = blocks.mode_product(db, ri, i)
            d = blocks.from_blocks(db, pl)
            if graft != "none":
                dn, gn = jnp.linalg.norm(d), jnp.linalg.norm(gr)
                d = d * jnp.where(dn > 0, gn / jnp.where(dn > 0, dn, 1.0), 0.0)
            ok = active & jnp.all(jnp.isfinite(d))
            new_stats.append(st)
            new_roots.append(rt)
            out.append(jnp.where(ok, d, gr))
        new_state = ShampooState(count_inc, mu, nu, tuple(new_stats),
                                 tuple(new_roots))
        return treedef.unflatten(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    **kwargs,
) -> optax.GradientTransformation:
    """Shampoo with a learning rate: `scale_by_shampoo` followed by a descent step.

    Keyword arguments (`block_size`, `precondition_every`, `stats_every`,
    `start_preconditioning_step`, `graft`, `graft_eps`, `exponent`) are those of
    `scale_by_shampoo`.

    Example:
      >>> opt = shampoo(learning_rate=1e-3, block_size=512, precondition_every=20)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state)
      >>> params = optax.apply_updates(params, updates)
    """
    return optax.chain(scale_by_shampoo(b1, b2, eps, **kwargs),
                       optax.scale_by_learning_rate(learning_rate))
