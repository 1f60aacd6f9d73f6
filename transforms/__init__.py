"""Optimizers that read the terrain, as Optax transformations.

Every optimizer is available by its config name through `make`, and `train_step`
calls any of them the same way:

    >>> import transforms as tx
    >>> opt = tx.make("sam", learning_rate=0.1, rho=0.05)
    >>> state = opt.init(params)
    >>> params, state, loss = tx.train_step(opt, loss_fn, params, state, batch, key)

Lion is `optax.lion` as is; like its paper, give it a learning rate 3–10× below
Adam's and a weight decay 3–10× above AdamW's:

    >>> opt = tx.make("lion", learning_rate=3e-4, weight_decay=1e-2)   # Adam: 1e-3, 1e-3

The building blocks are ordinary optax transforms and chain with the rest of optax:
`sharpness_aware` (SAM / ASAM / GSAM), `gauss_newton_bartlett` (Sophia-G's estimator
for `optax.contrib.sophia`), `scale_by_adahessian`, `scale_by_shampoo`, `scale_by_soap`,
`scale_by_kfac` (with `kfac_statistics` and `find_dense_layers`); Lion and Sophia-H are
optax's own. `make("kfac", ...)` needs `layers=find_dense_layers(apply_fn, params, x)`
and computes its statistics inside `train_step(..., apply_fn=apply_fn)`.

`make` also builds every optax optimizer by name (`tx.make("muon", learning_rate=0.02)`);
`describe()` lists every name with its hyper-parameters and defaults.
"""

from optax import lion
from optax.contrib import hutchinson_estimator_diag_hessian

from transforms._adahessian import (
    AdaHessianState,
    adahessian,
    hutchinson_diagonal,
    scale_by_adahessian,
    spatial_average,
)
from transforms.registry import (
    REQUIRED,
    Hyper,
    OptimizerSpec,
    describe,
    hyperparameters,
    make,
    names,
    register,
)
from transforms._sam import (
    SharpnessAwareState,
    asam,
    asam_ascent,
    gsam,
    sam,
    sam_ascent,
    sharpness_aware,
)
from transforms._sophia import (SophiaState, gauss_newton_bartlett, scale_by_sophia,
                               sophia_g, sophia_h)
from transforms.kfac import (
    KFACState,
    KFACStatistics,
    find_dense_layers,
    kfac,
    kfac_statistics,
    scale_by_kfac,
)
from transforms.shampoo import ShampooState, scale_by_shampoo, shampoo
from transforms.soap import SoapState, scale_by_soap, soap
from transforms.train import StepResult, train_step

__all__ = [
    "AdaHessianState", "Hyper", "OptimizerSpec", "REQUIRED", "SharpnessAwareState",
    "StepResult", "adahessian", "asam", "asam_ascent", "describe", "gauss_newton_bartlett",
    "gsam",
    "hutchinson_diagonal", "hutchinson_estimator_diag_hessian", "hyperparameters",
    "lion", "make", "names", "register", "sam", "sam_ascent", "scale_by_adahessian",
    "sharpness_aware", "SophiaState", "scale_by_sophia", "sophia_g", "sophia_h", "spatial_average",
    "train_step", "KFACState", "KFACStatistics", "ShampooState", "SoapState",
    "find_dense_layers", "kfac", "kfac_statistics", "scale_by_kfac", "scale_by_shampoo",
    "scale_by_soap", "shampoo", "soap",
]

# Instruments: the preconditioner an optimizer state implies (for ls.preconditioned).
from transforms.preconditioner import (KroneckerPreconditioner, preconditioned_lambda_max,
                                      preconditioner)

__all__ += ["KroneckerPreconditioner", "preconditioned_lambda_max", "preconditioner"]
