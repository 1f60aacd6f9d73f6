"""How many probes a trace estimate needs for a requested relative error.

Hutchinson's estimate averages `p` independent samples `zᵀAz`, so its standard error is
`σ/√p` with `σ²` the variance of one sample (for Rademacher probes
`σ² = 2(‖A‖_F² − Σ A_ii²)`). A few pilot probes estimate `σ` and the trace; the count
follows from `σ/√p <= rel_error·|tr A|`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from landscape import _validate


class ProbePlan(NamedTuple):
    """`num_probes` Hutchinson probes give one standard error of about
    `rel_error·|trace|`; `trace` and `sample_std` (σ of one probe's `zᵀAz`) come from
    `pilot_probes` pilot probes."""

    num_probes: int
    trace: jax.Array
    sample_std: jax.Array
    pilot_probes: int


@functools.partial(jax.jit, static_argnames=("num_probes",))
def _pilot(op, key, *, num_probes):
    mv, flat = op.flat_matvec()
    z = jax.random.rademacher(key, (num_probes, flat.shape[0]), flat.dtype)
    samples = jnp.sum(z * jax.lax.map(mv, z), axis=1)
    return samples.mean(), jnp.std(samples, ddof=1)


def probes_for(op, rel_error: float, *, key: jax.Array, pilot_probes: int = 20,
               min_probes: int = 2) -> ProbePlan:
    """The number of Hutchinson probes for a trace whose standard error is `rel_error`
    of its magnitude.

    Runs `pilot_probes` Rademacher probes (that many matvecs), estimates the variance
    of one sample `zᵀAz` and the trace, and returns
    `max(min_probes, ceil((σ / (rel_error·|tr|))²))`. The pilot's own uncertainty
    carries over: with 20 pilot probes σ is known to about ±16%, so the count to about
    ±30%; pass more pilot probes when that matters. The count is for
    `ls.trace(op, method="hutchinson")` with fresh probes; Hutch++ with the same count
    is usually tighter when a few large eigenvalues dominate (check its `std_error`).

    Not jit-safe by design: the count is a Python int, to be passed as `num_probes`.

    Example:
      >>> plan = ls.probes_for(H, 0.02, key=jax.random.key(0))   # ±2% (one std error)
      >>> tr = ls.trace(H, key=jax.random.key(1), num_probes=plan.num_probes,
      ...               method="hutchinson")
    """
    if not (isinstance(rel_error, (int, float, np.floating)) and rel_error > 0):
        raise ValueError(f"`rel_error` must be a positive number; got {rel_error!r}.")
    pilot_probes = _validate.positive_int(pilot_probes, "pilot_probes")
    min_probes = _validate.positive_int(min_probes, "min_probes")
    if pilot_probes < 2:
        raise ValueError("`pilot_probes` must be at least 2 to estimate a variance; "
                         f"got {pilot_probes}.")
    if not _validate.is_concrete(op, key):
        raise ValueError("`probes_for` returns a Python int and cannot run under "
                         "`jax.jit`; call it outside and pass the count in.")
    mean, std = _pilot(op, key, num_probes=pilot_probes)
    _validate.check_finite("The operator", mean, std)
    mean_f, std_f = float(mean), float(std)
    if mean_f == 0.0:
        raise ValueError("The pilot trace is 0, so a relative error is undefined; "
                         "ask `ls.trace` for an absolute standard error instead.")
    count = math.ceil((std_f / (rel_error * abs(mean_f))) ** 2)
    return ProbePlan(max(min_probes, count), mean, std, pilot_probes)
