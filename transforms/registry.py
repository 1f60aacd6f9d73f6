"""`make(name, **hyper)`: every optimizer by its config name, with validated hyper-parameters.

The registry maps a name to a builder and a spec of its hyper-parameters. Adding an
optimizer is one `register` call:

    register("shampoo", shampoo, {
        "learning_rate": LEARNING_RATE,
        "block_size": Hyper(128, positive_int),
        "eps": Hyper(1e-12, positive),
    })
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import optax

from transforms import _adahessian
from transforms._checks import (boolean, choice, fraction, integer, nonnegative, optional,
                                positive, positive_int, schedule_or, unit_interval)
from transforms import _sam
from transforms import _sophia
from transforms import kfac as _kfac
from transforms import shampoo as _shampoo
from transforms import soap as _soap

__all__ = ["Hyper", "LEARNING_RATE", "accepts_traced", "OptimizerSpec", "REQUIRED", "boolean", "choice",
           "fraction", "hyperparameters", "integer", "make", "names", "nonnegative",
           "optional", "positive", "positive_int", "register", "schedule_or",
           "unit_interval"]


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


class Hyper(NamedTuple):
    """One hyper-parameter: its default (or REQUIRED) and a check.

    `check(value, name) -> value` raises ValueError naming `name` and what is expected.
    """
    default: Any
    check: Callable[[Any, str], Any]


class OptimizerSpec(NamedTuple):
    """A registered optimizer: `builder(**hyper) -> GradientTransformation`.

    `traced`: whether hyper-parameters other than the learning rate may be arrays or
    tracers (vmapped); False where the builder branches on their values.
    """
    builder: Callable[..., optax.GradientTransformation]
    hyper: Mapping[str, Hyper]
    traced: bool = True


_REGISTRY: dict[str, OptimizerSpec] = {}


LEARNING_RATE = Hyper(REQUIRED, schedule_or(positive))


def register(name: str, builder: Callable[..., optax.GradientTransformation],
             hyper: Mapping[str, Hyper], *, overwrite: bool = False,
             traced: bool = True) -> None:
    """Add an optimizer to `make` under `name`; `traced=False` if its hyper-parameters
    (other than the learning rate) must be Python values."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string; got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"An optimizer named {name!r} is already registered; pass "
                         "overwrite=True to replace it.")
    _REGISTRY[name] = OptimizerSpec(builder, dict(hyper), traced)


def names() -> tuple[str, ...]:
    """The registered optimizer names, sorted."""
    return tuple(sorted(_REGISTRY))


def _spec(name):
    if name not in _REGISTRY:
        raise ValueError(f"Unknown optimizer {name!r}; valid choices: {', '.join(names())}.")
    return _REGISTRY[name]


def accepts_traced(name: str) -> bool:
    """Whether `name`'s hyper-parameters besides the learning rate may be traced (vmapped)."""
    return _spec(name).traced


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of optimizer `name` and their defaults (REQUIRED if none)."""
    return {k: h.default for k, h in _spec(name).hyper.items()}


def make(name: str, **hyper: Any) -> optax.GradientTransformationExtraArgs:
    """The optimizer registered as `name`, built from validated hyper-parameters.

    Names: `sgd`, `momentum`, `adam`, `adamw`, `lion`, `sam`, `asam`, `gsam`,
    `sophia_h`, `sophia_g`, `adahessian` (and whatever else is `register`ed); see
    `hyperparameters(name)` for each one's names and defaults. Numeric values may be
    0-d arrays, including traced ones, so `make` can be called inside `jax.vmap` over a
    learning rate. The result accepts every extra argument `train_step` passes.

    Raises:
      ValueError: unknown name (lists the valid names), unknown hyper-parameter (lists
        the valid ones), missing required one, or a bad value (says what is expected).

    Example:
      >>> opt = tx.make("sam", learning_rate=0.1, rho=0.05)
      >>> def final_loss(lr):   # one member of a learning-rate sweep
      ...     opt = tx.make("adam", learning_rate=lr)
      ...     ...               # lax.scan over tx.train_step(opt, ...)
      >>> losses = jax.jit(jax.vmap(final_loss))(jnp.logspace(-4, -1, 8))
    """
    spec = _spec(name)
    unknown = sorted(set(hyper) - set(spec.hyper))
    if unknown:
        raise ValueError(f"Unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for "
                         f"{name!r}; valid: {', '.join(spec.hyper)}.")
    values = {}
    for key, h in spec.hyper.items():
        if key in hyper:
            values[key] = h.check(hyper[key], key)
        elif h.default is REQUIRED:
            raise ValueError(f"{name!r} needs `{key}`; its hyper-parameters are "
                             f"{', '.join(spec.hyper)}.")
        else:
            values[key] = h.default
    return optax.with_extra_args_support(spec.builder(**values))


def _decayed(weight_decay, opt):
    # Coupled weight decay (added to the gradient); a literal 0 adds nothing to the step.
    if isinstance(weight_decay, (int, float)) and weight_decay == 0:
        return opt
    return optax.chain(optax.add_decayed_weights(weight_decay), opt)


def _momentum_sgd(learning_rate, momentum, nesterov, weight_decay):
    return _decayed(weight_decay,
                    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov))


def _plain_sgd(learning_rate, weight_decay):
    return _decayed(weight_decay, optax.sgd(learning_rate))


_B1, _B2 = Hyper(0.9, unit_interval), Hyper(0.999, unit_interval)
_WD0 = Hyper(0.0, schedule_or(nonnegative))
_SAM_COMMON = {"momentum": Hyper(0.0, unit_interval), "nesterov": Hyper(False, boolean),
               "weight_decay": Hyper(0.0, nonnegative),
               "num_chunks": Hyper(None, optional(positive_int))}
_SOPHIA_COMMON = {"b1": Hyper(0.965, unit_interval), "b2": Hyper(0.99, unit_interval),
                  "eps": Hyper(1e-8, positive), "weight_decay": Hyper(1e-4, nonnegative),
                  "gamma": Hyper(0.01, positive),
                  "clip_threshold": Hyper(1.0, optional(positive)),
                  "update_interval": Hyper(10, positive_int)}

register("sgd", _plain_sgd, {"learning_rate": LEARNING_RATE, "weight_decay": _WD0})
register("momentum", _momentum_sgd, {
    "learning_rate": LEARNING_RATE, "momentum": Hyper(0.9, unit_interval),
    "nesterov": Hyper(False, boolean), "weight_decay": _WD0})
register("adam", optax.adam, {"learning_rate": LEARNING_RATE, "b1": _B1, "b2": _B2,
                              "eps": Hyper(1e-8, nonnegative)})
register("adamw", optax.adamw, {"learning_rate": LEARNING_RATE, "b1": _B1, "b2": _B2,
                                "eps": Hyper(1e-8, nonnegative),
                                "weight_decay": Hyper(1e-4, schedule_or(nonnegative))})
register("lion", optax.lion, {"learning_rate": LEARNING_RATE, "b1": _B1,
                              "b2": Hyper(0.99, unit_interval),
                              "weight_decay": Hyper(1e-3, schedule_or(nonnegative))})
register("sam", _sam.sam, {"learning_rate": LEARNING_RATE,
                           "rho": Hyper(0.05, schedule_or(nonnegative)), **_SAM_COMMON})
register("asam", _sam.asam, {"learning_rate": LEARNING_RATE,
                             "rho": Hyper(0.5, schedule_or(nonnegative)),
                             "eta": Hyper(0.01, positive), **_SAM_COMMON})
register("gsam", _sam.gsam, {"learning_rate": LEARNING_RATE,
                             "rho": Hyper(0.05, schedule_or(nonnegative)),
                             "alpha": Hyper(0.1, schedule_or(nonnegative)), **_SAM_COMMON})
register("sophia_h", _sophia.sophia_h, {"learning_rate": LEARNING_RATE, **_SOPHIA_COMMON,
                                        "seed": Hyper(0, integer)})
register("sophia_g", _sophia.sophia_g, {"learning_rate": LEARNING_RATE, **_SOPHIA_COMMON,
                                        "loss": Hyper("cross_entropy",
                                                      choice("cross_entropy", "mse"))})
register("adahessian", _adahessian.adahessian, {
    "learning_rate": LEARNING_RATE, "b1": _B1, "b2": _B2, "eps": Hyper(1e-4, positive),
    "weight_decay": Hyper(0.0, nonnegative),
    "hessian_power": Hyper(1.0, fraction),
    "update_interval": Hyper(1, positive_int), "spatial_averaging": Hyper(True, boolean)})


_BLOCK = Hyper(1024, positive_int)
_EVERY = Hyper(10, positive_int)
register("shampoo", _shampoo.shampoo, {
    "learning_rate": LEARNING_RATE, "b1": _B1, "b2": Hyper(0.999, fraction),
    "eps": Hyper(1e-6, positive), "block_size": _BLOCK, "precondition_every": _EVERY,
    "stats_every": Hyper(1, positive_int), "start_preconditioning_step": Hyper(10, integer),
    "graft": Hyper("adam", choice("adam", "sgd", "none")), "graft_eps": Hyper(1e-8, positive),
    "exponent": Hyper(None, optional(positive))}, traced=False)
register("soap", _soap.soap, {
    "learning_rate": LEARNING_RATE, "b1": Hyper(0.95, unit_interval),
    "b2": Hyper(0.95, unit_interval), "eps": Hyper(1e-8, positive),
    "shampoo_b2": Hyper(None, optional(unit_interval)), "block_size": _BLOCK,
    "precondition_every": _EVERY, "start_preconditioning_step": Hyper(0, integer),
    "basis": Hyper("eigh", choice("eigh", "qr"))}, traced=False)


def _layers(value, name):
    if not isinstance(value, tuple) or not all(
            isinstance(v, _kfac.tagging.DenseLayer) for v in value):
        raise ValueError(f"`{name}` must be the tuple from "
                         "find_dense_layers(apply_fn, params, inputs).")
    return value


def _kfac_with_statistics(learning_rate, layers, damping, decay, inverse_every, momentum,
                          tikhonov, loss, num_samples):
    """K-FAC that computes its own statistics from `train_step`'s extra arguments.

    `update` uses `statistics` when given; otherwise it draws them for this step's batch
    with `kfac_statistics(apply_fn, params, batch[0], key=key)` (the true Fisher), so
    K-FAC runs through `train_step(..., apply_fn=...)` like every other optimizer.
    """
    inner = _kfac.kfac(learning_rate, layers, damping=damping, decay=decay,
                       inverse_every=inverse_every, momentum=momentum, tikhonov=tikhonov)

    def update_fn(updates, state, params=None, *, statistics=None, apply_fn=None,
                  batch=None, key=None, **extra_args):
        if statistics is None:
            if apply_fn is None or batch is None or key is None or params is None:
                raise ValueError("kfac needs `statistics`, or `apply_fn`, `batch`, `key` "
                                 "and `params` to compute them (train_step(..., "
                                 "apply_fn=apply_fn) supplies them).")
            statistics = _kfac.kfac_statistics(apply_fn, params, batch[0], key=key,
                                               loss=loss, num_samples=num_samples)
        return inner.update(updates, state, params, statistics=statistics)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


register("kfac", _kfac_with_statistics, {
    "learning_rate": LEARNING_RATE, "layers": Hyper(REQUIRED, _layers),
    "damping": Hyper(1e-3, positive), "decay": Hyper(0.95, unit_interval),
    "inverse_every": _EVERY, "momentum": Hyper(0.0, unit_interval),
    "tikhonov": Hyper("factored", choice("factored", "exact")),
    "loss": Hyper("cross_entropy", choice("cross_entropy", "mse")),
    "num_samples": Hyper(1, positive_int)}, traced=False)
