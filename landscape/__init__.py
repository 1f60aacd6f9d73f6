"""Measuring the terrain: curvature operators, their spectra and estimators.

Every function works on any pure `loss_fn(params, batch) -> scalar` (the mean loss)
or `apply_fn(params, inputs) -> outputs` and any parameter pytree.
"""

from landscape.blocks import BlockOperator, path_name, restrict
from landscape.chunking import chunk_mean
from landscape.index import HessianIndex, hessian_index
from landscape.layers import LayerGradNorms, layer_grad_norms, layer_norms
from landscape.losses import accuracy, cross_entropy, mse
from landscape.operators import (
    CurvatureOperator,
    LinearOperator,
    fisher,
    ggn,
    hessian,
    per_example_grads,
    prepared,
)
from landscape.per_block import BlockReport, per_block
from landscape.probes import ProbePlan, probes_for
from landscape.sharding import shard, shard_batch, shard_params
from landscape.spectrum import Density, Eigen, density, eigenvalues, lanczos
from landscape.trace import DiagonalEstimate, TraceEstimate, diagonal, trace

__all__ = [
    "path_name", "restrict",
    "HessianIndex", "LayerGradNorms", "hessian_index", "layer_grad_norms", "layer_norms",
    "CurvatureOperator", "Density", "DiagonalEstimate", "Eigen", "LinearOperator",
    "TraceEstimate", "accuracy", "chunk_mean", "cross_entropy", "density", "diagonal",
    "eigenvalues", "fisher", "ggn", "hessian", "lanczos", "mse", "per_example_grads",
    "trace",
]
__all__ += ["BlockOperator", "BlockReport", "ProbePlan", "per_block", "prepared", "probes_for",
            "shard", "shard_batch", "shard_params"]

# Sharpness, loss surfaces, gradient noise, reparameterization (`landscape.plot` draws
# them; it is not imported here so that `import landscape` does not load matplotlib).
from landscape import sharpness
from landscape import memory  # compiled memory, chunk sizes for a budget
from landscape.directions import (
    PCADirections,
    filter_normalize,
    filter_normalized_direction,
    pca_directions,
    random_direction,
)
from landscape.noise import (
    GradientSNR,
    MinibatchVariance,
    NoiseScale,
    gradient_noise_scale,
    gradient_snr,
    minibatch_variance,
)
from landscape.reparam import rescale_relu
from landscape.surfaces import Curve, Surface, interpolate, surface_1d, surface_2d

__all__ += [
    "Curve", "GradientSNR", "MinibatchVariance", "NoiseScale", "PCADirections", "Surface",
    "filter_normalize", "filter_normalized_direction", "gradient_noise_scale",
    "gradient_snr", "interpolate", "minibatch_variance", "pca_directions",
    "random_direction", "rescale_relu", "sharpness", "surface_1d", "surface_2d",
]

from landscape.critical import CriticalPoint, critical_points, find_critical_point

__all__ += ["CriticalPoint", "critical_points", "find_critical_point"]

# Instruments: preconditioned sharpness, mode connectivity, block heterogeneity.
from landscape.preconditioned import PreconditionedOperator, preconditioned

__all__ += ["PreconditionedOperator", "preconditioned"]

from landscape.connectivity import (
    Connection,
    LinearPath,
    connect,
    curve_point,
    linear_barrier,
)

__all__ += ["Connection", "LinearPath", "connect", "curve_point", "linear_barrier"]

from landscape.heterogeneity import BlockHeterogeneity, block_heterogeneity, js_distance

__all__ += ["BlockHeterogeneity", "block_heterogeneity", "js_distance"]
