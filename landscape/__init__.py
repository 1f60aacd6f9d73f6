"""Measuring the terrain: curvature operators, their spectra and estimators.

Every function works on any pure `loss_fn(params, batch) -> scalar` (the mean loss)
or `apply_fn(params, inputs) -> outputs` and any parameter pytree.
"""

from landscape.chunking import chunk_mean
from landscape.losses import accuracy, cross_entropy, mse
from landscape.operators import (
    CurvatureOperator,
    LinearOperator,
    fisher,
    ggn,
    hessian,
    per_example_grads,
)
from landscape.spectrum import Density, Eigen, density, eigenvalues, lanczos
from landscape.trace import DiagonalEstimate, TraceEstimate, diagonal, trace

__all__ = [
    "CurvatureOperator", "Density", "DiagonalEstimate", "Eigen", "LinearOperator",
    "TraceEstimate", "accuracy", "chunk_mean", "cross_entropy", "density", "diagonal",
    "eigenvalues", "fisher", "ggn", "hessian", "lanczos", "mse", "per_example_grads",
    "trace",
]
