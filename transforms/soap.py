"""SOAP: Adam run in the eigenbasis of Shampoo's preconditioner.

Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson & Kakade (2024), "SOAP:
Improving and Stabilizing Shampoo using Adam".
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from landscape import _validate as check
from transforms import _second_order_blocks as blocks

_BASES = ("eigh", "qr")


@jax.tree_util.register_static   # no children: jit, vmap and tree maps carry it as is
@dataclasses.dataclass(frozen=True)
class _ParamLayout:
    """The parameters' tree structure and leaf shapes, kept in `SoapState.layout` (the
    moments are stored in block form, which does not record them)."""

    treedef: Any
    leaves: tuple   # one `jax.ShapeDtypeStruct` per leaf


class SoapState(NamedTuple):
    """State of `scale_by_soap`.

    `mu`, `nu`, `stats` and `bases` are tuples with one entry per parameter leaf in
    `jax.tree.leaves` order. For a preconditioned leaf (a matrix or tensor), `stats` and
    `bases` hold the Shampoo statistics and their eigenbases (one `(num_blocks, b_i,
    b_i)` array per dimension), and `mu` and `nu` Adam's first and second moments in the
    rotated coordinates of the current bases, blocked as `(num_blocks, b_1, …, b_k)`.
    For vectors and scalars (plain Adam) `stats` and `bases` are empty tuples and `mu`
    and `nu` are shaped like the parameter, in its own coordinates. `layout` records
    the parameters' structure and shapes.
    """

    count: jax.Array   # steps taken (int32)
    mu: tuple
    nu: tuple
    stats: tuple
    bases: tuple
    layout: _ParamLayout


def _rotate(xb, bases, transpose):
    for i, q in enumerate(bases):
        xb = blocks.mode_product(xb, jnp.swapaxes(q, -1, -2) if transpose else q, i)
    return xb


def _eigh_bases(stats, bases, nus):
    """Eigenbases of every statistic, the decompositions one after another."""
    new, token = [], None
    for st, qs in zip(stats, bases):
        out = []
        for s, q in zip(st, qs):
            out.append(blocks.eigenbasis(blocks.after(s, token), q))
            token = out[-1]
        new.append(tuple(out))
    return tuple(new), nus


def _power_bases(stats, bases, nus):
    """One power step + QR per statistic (in sequence), v permuted to follow the
    re-sorted columns."""
    new, new_nus, token = [], [], None
    for st, qs, v in zip(stats, bases, nus):
        out = []
        for i, (s, q) in enumerate(zip(st, qs)):
            q, order = blocks.qr_power_step(blocks.after(s, token), q)
            v = _permute(v, order, i)
            out.append(q)
            token = q
        new.append(tuple(out))
        new_nus.append(v)
    return tuple(new), tuple(new_nus)


def _rebase(mus, old, new):
    """The rotated first moments, re-expressed from the bases `old` in the bases `new`:
    Q_newᵀ (Q_old m Q_oldᵀ) Q_new along every dimension (plain leaves: `()`)."""
    return tuple(m if not qo else _rotate(_rotate(m, qo, transpose=False), qn,
                                          transpose=True)
                 for m, qo, qn in zip(mus, old, new))


def _refresh(hp, t, refresh, stats, state):
    """(bases, mu, nu) for this step: on a refresh step the new bases, the rotated first
    moments re-expressed in them and (`qr`) v permuted to follow the sorted columns;
    otherwise the state's own. Only the preconditioned leaves' mu enter the `lax.cond`
    (they must change on refresh steps); v stays out of it unless `qr` permutes it."""
    pre = tuple(m if st else () for m, st in zip(state.mu, stats))
    if hp["basis"] == "eigh":
        def fresh(s, q, m):
            new = _eigh_bases(s, q, ())[0]
            return new, _rebase(m, q, new)
        bases, pre = jax.lax.cond(refresh, fresh, lambda s, q, m: (q, m),
                                  stats, state.bases, pre)
        nus = state.nu
    else:
        def fresh(s, q, m, v):
            new, v = jax.lax.cond(t == hp["start"], _eigh_bases, _power_bases, s, q, v)
            return new, _rebase(m, q, new), v
        nus = tuple(v if st else () for v, st in zip(state.nu, stats))
        bases, pre, nus = jax.lax.cond(refresh, fresh, lambda s, q, m, v: (q, m, v),
                                       stats, state.bases, pre, nus)
        nus = tuple(p if st else v for p, v, st in zip(nus, state.nu, stats))
    mus = tuple(p if st else m for p, m, st in zip(pre, state.mu, stats))
    return bases, mus, nus


def _adam_in_basis(pl, g, m, v, qs, hp, c1, c2):
    """(update, new m, new v) for one leaf: Adam's step in the rotated coordinates, where
    m and v are kept (plain Adam for vectors and scalars)."""
    if pl.preconditioned:
        g = _rotate(blocks.to_blocks(g, pl), qs, transpose=True)
        v = (1 - hp["b2"]) * (g * g) + hp["b2"] * v
    else:
        v = (1 - hp["b2"]) * (g * jnp.conj(g)).real + hp["b2"] * v
    m = (1 - hp["b1"]) * g + hp["b1"] * m
    d = (m / c1.astype(m.dtype)) / (jnp.sqrt(v / c2.astype(v.dtype)) + hp["eps"])
    if pl.preconditioned:
        d = blocks.from_blocks(_rotate(d, qs, transpose=False), pl)
    return d, m, v


def _soap_update(hp, updates, state, step):
    """One SOAP step; `hp` holds the builder's checked settings."""
    t, refresh = blocks.schedule(state.count, step, hp["start"], hp["precondition_every"])
    t_inc = (t + 1)
    leaves_g, treedef = jax.tree.flatten(updates)
    dtype = jnp.result_type(*leaves_g) if leaves_g else jnp.float32
    c1 = 1 - hp["b1"] ** t_inc.astype(dtype)
    c2 = 1 - hp["b2"] ** t_inc.astype(dtype)
    plans = [blocks.make_plan(jnp.shape(g), hp["block_size"]) for g in leaves_g]
    sb2 = hp["shampoo_b2"]
    stats = tuple(() if not pl.preconditioned else tuple(
        sb2 * s + (1 - sb2) * blocks.mode_statistic(blocks.to_blocks(g, pl), i)
        for i, s in enumerate(st)) for pl, g, st in zip(plans, leaves_g, state.stats))
    bases, mus, nus = _refresh(hp, t, refresh, stats, state)
    out, new_mus, new_nus = [], [], []
    for pl, g, m, v, qs in zip(plans, leaves_g, mus, nus, bases):
        u, m, v = _adam_in_basis(pl, g, m, v, qs, hp, c1, c2)
        out.append(u)
        new_mus.append(m)
        new_nus.append(v)
    new_state = SoapState(optax.safe_increment(state.count), tuple(new_mus),
                          tuple(new_nus), stats, bases, state.layout)
    return treedef.unflatten(out), new_state


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    *,
    shampoo_b2: float | None = None,
    block_size: int = 1024,
    precondition_every: int = 10,
    start_preconditioning_step: int = 0,
    basis: str = "eigh",
) -> optax.GradientTransformation:
    """Rescale updates by SOAP (no learning rate; see `soap`).

    For a matrix parameter with gradient G at step t:

    1. L ← β L + (1 − β) G Gᵀ, R ← β R + (1 − β) Gᵀ G (β = `shampoo_b2`, default b2);
       tensors keep one statistic per dimension, and long dimensions are blocked as in
       Shampoo (`block_size`).
    2. Every `precondition_every` steps from `start_preconditioning_step`, the bases
       Q_L, Q_R are refreshed: eigenvectors from `eigh` (`basis="eigh"`), or one power
       step Q ← qr(S Q) after the first `eigh` (`basis="qr"`, SOAP's cheaper refresh,
       which also permutes Adam's second moment to follow the sorted columns). Before
       the first refresh the bases are the identity; a failed decomposition keeps the
       previous basis.
    3. G' = Q_Lᵀ G Q_R; both of Adam's moments live in these rotated coordinates, as in
       the reference implementation: m ← b1 m + (1 − b1) G', v ← b2 v + (1 − b2) G'²,
       update = Q_L [m̂ / (√v̂ + eps)] Q_Rᵀ with Adam's bias corrections, exactly
       optax's Adam when the bases are the identity. A refresh re-expresses m in the new
       bases, m ← Q_newᵀ (Q_old m Q_oldᵀ) Q_new, so m is the same moment as if it were
       kept in the original coordinates (up to rounding).

    Vectors and scalars use plain Adam. Unlike the reference implementation, the first
    step is not skipped: its basis comes from the first gradient's statistics.

    Cost for an (m × n) parameter with blocks of size b: memory O(mn + (m + n)·b) (two
    moments, statistics and bases); compute per step O(mn·b) for the statistics and two
    rotations, G into the bases and the update out of them (one product per dimension
    each: four matrix products for a matrix), plus, per refresh, O((m + n)·b²) for
    `eigh` or QR and four more products to re-express m.

    In a vmapped group (a sweep), pass the global step count as `update(..., step=t)`
    with `t` unbatched (`in_axes=None`, or through `transforms.train_step`'s extra
    arguments): the refresh condition is then computed from `t` rather than from each
    member's own counter, so its `lax.cond` stays a branch and the decompositions run once
    per period for the whole group instead of at every step. `t` must equal the number of
    updates taken before this one (what `state.count` holds). Without `step`, the state's
    counter decides, as in any optax transform. Decompositions run one matrix at a time
    and one after another (batched LAPACK calls deadlocked XLA's CPU thread pool).

    `b1`, `b2`, `eps` and `shampoo_b2` may be arrays (e.g. traced inside a `vmap` over a
    hyper-parameter grid); they are then not checked here.

    Args:
      b1: Adam's first-moment decay in [0, 1).
      b2: Adam's second-moment decay in [0, 1).
      eps: Adam's ε (>= 0).
      shampoo_b2: decay of the statistics in [0, 1); by default b2.
      block_size: the largest block along any dimension (>= 2).
      precondition_every: steps between basis refreshes (>= 1).
      start_preconditioning_step: the step (from 0) of the first refresh.
      basis: "eigh" or "qr".

    Example:
      >>> opt = optax.chain(scale_by_soap(), optax.scale_by_learning_rate(3e-3))
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state, params)
    """
    b2 = blocks.checked(check.unit_interval, b2, "b2")
    hp = dict(
        b1=blocks.checked(check.unit_interval, b1, "b1"), b2=b2,
        eps=blocks.checked(check.nonnegative, eps, "eps"),
        shampoo_b2=b2 if shampoo_b2 is None else blocks.checked(check.unit_interval, shampoo_b2,
                                                          "shampoo_b2"),
        block_size=blocks.check_block_size(block_size),
        precondition_every=check.positive_int(precondition_every, "precondition_every"),
        start=check.nonnegative_int(start_preconditioning_step,
                                     "start_preconditioning_step"),
        basis=check.choice(basis, "basis", _BASES))

    def init_fn(params):
        stats, bases, mu, nu = [], [], [], []
        leaves, treedef = jax.tree.flatten(params)
        for p in leaves:
            pl = blocks.make_plan(jnp.shape(p), hp["block_size"])
            if pl.preconditioned:
                stats.append(blocks.zero_blocks(pl, p.dtype))
                bases.append(blocks.identity_blocks(pl, p.dtype))
                mu.append(jnp.zeros((pl.total_blocks,) + pl.block, p.dtype))
                nu.append(jnp.zeros((pl.total_blocks,) + pl.block, p.dtype))
            else:
                stats.append(())
                bases.append(())
                mu.append(jnp.zeros_like(p))
                nu.append(jnp.zeros_like(p))
        layout = _ParamLayout(treedef, tuple(
            jax.ShapeDtypeStruct(jnp.shape(p), jnp.result_type(p)) for p in leaves))
        return SoapState(jnp.zeros([], jnp.int32), tuple(mu), tuple(nu), tuple(stats),
                         tuple(bases), layout)

    def update_fn(updates, state, params=None, *, step=None, **extra_args):
        del params, extra_args
        return _soap_update(hp, updates, state, step)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _permute(v, order, i):
    """Reorder axis 1 + i of the rotated second moment by each block's column order."""
    shape = [order.shape[0]] + [1] * (v.ndim - 1)
    shape[1 + i] = order.shape[1]
    idx = jnp.broadcast_to(order.reshape(shape), v.shape)
    return jnp.take_along_axis(v, idx, axis=1 + i)


def soap(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.95,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    **kwargs,
) -> optax.GradientTransformation:
    """SOAP with a learning rate: `scale_by_soap`, decoupled weight decay (added to the
    scaled update, as in `optax.adamw`; `update` then needs `params`), a descent step.

    Keyword arguments (`shampoo_b2`, `block_size`, `precondition_every`,
    `start_preconditioning_step`, `basis`) are those of `scale_by_soap`.

    Example:
      >>> opt = soap(learning_rate=3e-3, precondition_every=10)
      >>> state = opt.init(params)
      >>> updates, state = opt.update(grads, state)
      >>> params = optax.apply_updates(params, updates)
    """
    weight_decay = blocks.checked(check.nonnegative, weight_decay, "weight_decay")
    return blocks.descent(scale_by_soap(b1, b2, eps, **kwargs), learning_rate,
                          weight_decay)
