"""Per-block curvature in one call: each block's top eigenvalues, trace and density.

A block is a set of parameter leaves (a layer, "all attention weights", any predicate
on the path). Eigenvalues and densities are those of the diagonal block `H_bb`
(`landscape.restrict`), one Lanczos run per block. Traces share probes across blocks:
one full matvec per probe serves every block at once (see `per_block`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from landscape import _validate
from landscape import _vectors as V
from landscape.blocks import path_name, restrict
from landscape.layers import default_layer
from landscape.spectrum import Density, density as _density, eigenvalues
from landscape.operators import MODES, prepared
from landscape.trace import _mean_and_error, block_size_for, trace as _trace


class BlockReport(NamedTuple):
    """The curvature of one block `H_bb`.

    size: parameters in the block.
    values, residuals, converged: the block's top `k` eigenvalues (descending), their
      residual norms and convergence flags (as in `ls.Eigen`).
    trace, trace_std_error: the block's trace and one standard error.
    density: the block's spectral density (`ls.Density`), or None unless asked.
    """

    size: int
    values: jax.Array
    residuals: jax.Array
    converged: jax.Array
    trace: jax.Array
    trace_std_error: jax.Array
    density: Density | None

    @property
    def lambda_max(self) -> jax.Array:
        return self.values[0]


Blocks = dict[str, Callable[[str, Any], bool]] | Callable[[str], str] | None


def _block_predicates(params: Any, blocks: Blocks) -> dict[str, Callable[[str, Any], bool]]:
    """`{name: select(path, leaf)}`, in the order blocks first appear in `params`."""
    if blocks is None:
        blocks = default_layer
    if isinstance(blocks, dict):
        if not blocks:
            raise ValueError("`blocks` is an empty dict; give at least one "
                             "name -> select(path, leaf).")
        for name, select in blocks.items():
            if not callable(select):
                raise ValueError(f"`blocks[{name!r}]` must be a predicate "
                                 f"select(path, leaf) -> bool; got {type(select).__name__}.")
        return dict(blocks)
    if not callable(blocks):
        raise ValueError("`blocks` must be None (one block per layer), a dict "
                         "name -> select(path, leaf), or a function path -> block name; "
                         f"got {type(blocks).__name__}.")
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = blocks(path_name(path))
        if name not in names:
            names.append(name)
    return {name: (lambda p, leaf, name=name: blocks(p) == name) for name in names}


def _masks(params: Any, predicates: dict) -> np.ndarray:
    """`(num_blocks, num_leaves)` 0/1 rows marking the leaves of each block (in
    `jax.tree.leaves` order)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    rows = []
    for name, select in predicates.items():
        row = np.array([bool(select(path_name(path), leaf)) for path, leaf in leaves])
        if not row.any():
            raise ValueError(f"Block {name!r} of `blocks` selects no parameter; paths "
                             f"look like {[path_name(p) for p, _ in leaves[:3]]}.")
        rows.append(row)
    return np.stack(rows)


@functools.partial(jax.jit, static_argnames=("num_probes", "block", "mode"))
def _shared_trace(op, key, masks, *, num_probes, block, mode):
    mv = prepared(op, mode).matvec
    # The same probes as `ls.trace(op, method="hutchinson")`: the blocks' samples add
    # up to its samples exactly.
    z = V.rademacher(key, op.params, num_probes)

    def one(zi):
        per_leaf = jnp.stack([jnp.vdot(a, b) for a, b in zip(V.leaves(zi),
                                                              V.leaves(mv(zi)))])
        return masks @ per_leaf

    samples = jax.lax.map(one, z, batch_size=block if block > 1 else None)  # (probes, blocks)
    return _mean_and_error(samples)


def per_block(op, blocks: Blocks = None, *, key: jax.Array, k: int = 1,
              num_steps: int | None = None, tol: float = 1e-3, trace_probes: int = 100,
              trace_method: str = "shared", density: bool = False,
              density_probes: int = 4, density_steps: int = 40, block_size: int | None = None,
              mode: str = "auto") -> dict[str, BlockReport]:
    """Top eigenvalues, trace and (optionally) spectral density of each block `H_bb`.

    Args:
      op: any operator (`hessian`, `ggn`, `fisher`, `LinearOperator`).
      blocks: None for one block per layer (`landscape.layers.default_layer`: a leaf's
        path without its last part, so a layer's kernel and bias go together); a dict
        `{name: select(path, leaf) -> bool}`; or a function `path -> block name`.
        Blocks may overlap, but only a partition has traces that sum to `tr H`.
      key: PRNG key; each block's Lanczos start and probes derive from it.
      k, num_steps, tol: as in `ls.eigenvalues`, per block.
      trace_probes: probes for the traces.
      trace_method: how the traces are estimated.

        - `"shared"` (default): Hutchinson with full-length Rademacher probes `z`; block
          b's sample is `z_bᵀ (H z)_b`, whose mean is `tr H_bb`. One full matvec per
          probe serves every block, and the blocks' estimates sum exactly to the full
          Hutchinson estimate with the same probes. The price is variance: one sample
          of block b has variance `2(‖H_bb‖_F² − Σ_i H_ii²) + ‖H_b,rest‖_F²`, the last
          term from the off-diagonal blocks that a block-only probe would not see.
        - `"restricted"`: Hutch++ (`ls.trace`) on each restricted operator, probes
          living in the block alone: no off-diagonal variance and Hutch++'s deflation,
          at `trace_probes` full matvecs per block.
      density: also run stochastic Lanczos quadrature on each block
        (`density_probes × density_steps` matvecs per block).
      block_size, mode: trace probes applied together and how the operator is prepared
        for its many products, as in `ls.trace` (`ls.operators.prepared`).

    Cost in full matvecs: `blocks × (num_steps + k)` for the eigenvalues (a restricted
    matvec is one full matvec), plus `trace_probes` ("shared") or
    `blocks × trace_probes` ("restricted").

    Returns:
      A dict from block name to `BlockReport`, in the order blocks first appear in the
      parameters.

    Example:
      >>> H = ls.hessian(loss_fn, params, batch, chunk_size=500)
      >>> rep = ls.per_block(H, key=jax.random.key(0))        # one block per layer
      >>> {name: float(r.lambda_max) for name, r in rep.items()}
      >>> first = ls.per_block(H, {"first": lambda p, _: p.startswith("layers/0/"),
      ...                          "rest": lambda p, _: not p.startswith("layers/0/")}, key=key)
    """
    _validate.choice(trace_method, "trace_method", ("shared", "restricted"))
    trace_probes = _validate.positive_int(trace_probes, "trace_probes")
    k = _validate.positive_int(k, "k")
    _validate.choice(mode, "mode", MODES)
    predicates = _block_predicates(op.params, blocks)
    masks = _masks(op.params, predicates)
    sizes = np.array([int(np.size(x)) for x in jax.tree.leaves(op.params)])
    k_eig, k_trace, k_den = jax.random.split(key, 3)
    if trace_method == "shared":
        dtype = op.dtype
        traces, errors = _shared_trace(op, k_trace, jnp.asarray(masks, dtype),
                                       num_probes=trace_probes, mode=mode,
                                       block=block_size_for(op, trace_probes, block_size))
        _validate.check_finite("The operator", traces)
    reports = {}
    for i, (name, select) in enumerate(predicates.items()):
        block = restrict(op, select)
        # A block smaller than k (a bias) reports all of its eigenvalues.
        eig = eigenvalues(block, min(k, block.size), key=jax.random.fold_in(k_eig, i),
                          num_steps=num_steps, tol=tol, mode=mode)
        if trace_method == "shared":
            tr, err = traces[i], errors[i]
        else:
            est = _trace(block, key=jax.random.fold_in(k_trace, i),
                         num_probes=max(trace_probes, 3), block_size=block_size, mode=mode)
            tr, err = est.value, est.std_error
        den = _density(block, key=jax.random.fold_in(k_den, i),
                       num_probes=density_probes, num_steps=density_steps,
                       mode=mode) if density else None
        reports[name] = BlockReport(int(masks[i] @ sizes), eig.values, eig.residuals,
                                    eig.converged, tr, err, den)
    return reports
