"""`make(name, **hyper)`: every optimizer by its config name, with validated hyper-parameters.

A name resolves, in order, to

1. Basin's registry (`register`): Basin's own optimizers, and optax's under Basin's
   defaults and checks (`sgd`, `momentum`, `adam`, `adamw`, `lion`);
2. `optax.<name>`, then `optax.contrib.<name>`, if that is an *optimizer alias*: a
   public function (or `functools.partial` of one) whose first parameter is
   `learning_rate` and that is defined in
   optax's alias module (`optax._src.alias`: `adabelief`, `adafactor`, `nadam`, ...) or
   exported by `optax.contrib` under a name not starting with `scale_by_` (`muon`,
   `schedule_free_adamw`, `ademamix`, `adopt`, `prodigy`, ...). The rule leaves out
   schedules, losses, building blocks (`scale_by_*`), combinators (`chain`, `clip`) and
   wrappers whose first argument is another optimizer (`contrib.schedule_free`).

Hyper-parameter names are checked against the registered spec or the optax function's
signature; values of optax's functions are checked by optax itself (Basin checks only
that `learning_rate` is a positive number or a schedule). `describe()` lists every
name with its hyper-parameters and defaults. Adding an optimizer is one `register` call:

    register("shampoo", shampoo, {
        "learning_rate": LEARNING_RATE,
        "block_size": Hyper(128, positive_int),
        "eps": Hyper(1e-12, positive),
    })

Checks come from `landscape._validate`, the one vocabulary of argument checks: they
accept traced values, so every hyper-parameter may be swept inside `jax.vmap`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple

import optax
from optax import contrib as _contrib

from landscape._validate import (boolean, closed_unit_interval, fraction, integer,
                                 nonnegative, nonnegative_int, one_of, optional, positive,
                                 positive_int, schedule_or, unit_interval)
from transforms import _adahessian
from transforms import _sam
from transforms import _sophia
from transforms import kfac as _kfac
from transforms import shampoo as _shampoo
from transforms import soap as _soap

__all__ = ["Hyper", "LEARNING_RATE", "OptimizerSpec", "REQUIRED",
           "boolean", "closed_unit_interval", "describe", "fraction", "hyperparameters",
           "integer", "make", "names", "nonnegative", "nonnegative_int", "one_of",
           "optax_names", "optional", "positive", "positive_int", "register",
           "schedule_or", "unit_interval"]


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
    """A registered optimizer: `builder(**hyper) -> GradientTransformation`."""
    builder: Callable[..., optax.GradientTransformation]
    hyper: Mapping[str, Hyper]


_REGISTRY: dict[str, OptimizerSpec] = {}


LEARNING_RATE = Hyper(REQUIRED, schedule_or(positive))


def register(name: str, builder: Callable[..., optax.GradientTransformation],
             hyper: Mapping[str, Hyper], *, overwrite: bool = False) -> None:
    """Add an optimizer to `make` under `name` (it shadows an optax one of that name)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string; got {name!r}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"An optimizer named {name!r} is already registered; pass "
                         "overwrite=True to replace it.")
    _REGISTRY[name] = OptimizerSpec(builder, dict(hyper))


def names() -> tuple[str, ...]:
    """The names in Basin's registry, sorted (`optax_names()` lists the rest)."""
    return tuple(sorted(_REGISTRY))


def _is_optax_alias(fn: Any, source: str, name: str) -> bool:
    # `nadam`, `nadamw` are functools.partial objects of alias functions
    base = fn.func if isinstance(fn, functools.partial) else fn
    if name.startswith("_") or not inspect.isfunction(base):
        return False
    if source == "optax" and base.__module__ != "optax._src.alias":
        return False
    if source == "optax.contrib" and name.startswith("scale_by_"):
        return False
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "learning_rate"


@functools.cache
def _optax_table() -> dict[str, tuple[str, Callable]]:
    table: dict[str, tuple[str, Callable]] = {}
    for source, module in (("optax.contrib", _contrib), ("optax", optax)):
        for name in dir(module):
            fn = getattr(module, name, None)
            if _is_optax_alias(fn, source, name):
                table[name] = (source, fn)   # optax.<name> wins over optax.contrib.<name>
    return table


def optax_names() -> tuple[str, ...]:
    """The optax optimizer aliases `make` resolves (see the module docstring), sorted,
    without those Basin's registry shadows."""
    return tuple(sorted(set(_optax_table()) - set(_REGISTRY)))


def _all_names() -> tuple[str, ...]:
    return tuple(sorted(set(_REGISTRY) | set(_optax_table())))


def _signature(fn: Callable) -> dict[str, Any]:
    """Keyword parameters of an optax function and their defaults (REQUIRED if none)."""
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[p.name] = REQUIRED if p.default is p.empty else p.default
    return out


def _resolve(name: str) -> tuple[str, Mapping[str, Any], Callable]:
    """(source, {hyper: default}, build(**values)) for `name`."""
    if not isinstance(name, str):
        raise ValueError(f"`name` must be an optimizer name (a string); got {name!r}.")
    if name in _REGISTRY:
        spec = _REGISTRY[name]
        return "basin", {k: h.default for k, h in spec.hyper.items()}, spec.builder
    if name in _optax_table():
        source, fn = _optax_table()[name]
        return source, _signature(fn), fn
    raise ValueError(f"Unknown optimizer {name!r}; valid choices: Basin's "
                     f"{', '.join(names())}; optax's {', '.join(optax_names())}.")


def hyperparameters(name: str) -> dict[str, Any]:
    """The hyper-parameters of optimizer `name` and their defaults (REQUIRED if none)."""
    return dict(_resolve(name)[1])


def describe() -> list[tuple[str, str, dict[str, Any]]]:
    """Every name `make` accepts: `(name, source, {hyper: default})`, sorted by name;
    `source` is "basin", "optax" or "optax.contrib" (for `basin list --optimizers`).

    Example:
      >>> for name, source, hyper in tx.describe():
      ...     print(name, source, hyper)
    """
    return [(n, *_resolve(n)[:2]) for n in _all_names()]


def _validated(name: str, source: str, accepted: Mapping[str, Any],
               hyper: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(hyper) - set(accepted))
    if unknown:
        raise ValueError(f"Unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for "
                         f"{name!r} ({source}); valid: {', '.join(accepted)}.")
    missing = [k for k, d in accepted.items() if d is REQUIRED and k not in hyper]
    if missing:
        raise ValueError(f"{name!r} needs `{missing[0]}`; its hyper-parameters are "
                         f"{', '.join(accepted)}.")
    if source == "basin":
        checks = _REGISTRY[name].hyper
        return {k: checks[k].check(hyper[k], k) if k in hyper else d
                for k, d in accepted.items()}
    if hyper.get("learning_rate") is not None:
        LEARNING_RATE.check(hyper["learning_rate"], "learning_rate")
    return dict(hyper)


def make(name: str, **hyper: Any) -> optax.GradientTransformationExtraArgs:
    """The optimizer named `name`, built from validated hyper-parameters.

    Basin's names: `sgd`, `momentum`, `adam`, `adamw`, `lion`, `sam`, `asam`, `gsam`,
    `sophia_h`, `sophia_g`, `adahessian`, `shampoo`, `soap`, `kfac` (and whatever else
    is `register`ed); then every optax optimizer alias (`muon`, `schedule_free_adamw`,
    `adafactor`, ...: see the module docstring for the rule and `describe()` for the
    list). Numeric values may be 0-d arrays, including traced ones, so `make` can be
    called inside `jax.vmap` over a learning rate. The result accepts every extra
    argument `train_step` passes.

    Raises:
      ValueError: unknown name (lists the valid names), unknown hyper-parameter (lists
        the valid ones), missing required one, or a bad value (says what is expected).

    Example:
      >>> opt = tx.make("sam", learning_rate=0.1, rho=0.05)
      >>> opt = tx.make("muon", learning_rate=0.02)          # optax.contrib.muon
      >>> def final_loss(lr):   # one member of a learning-rate sweep
      ...     opt = tx.make("adam", learning_rate=lr)
      ...     ...               # lax.scan over tx.train_step(opt, ...)
      >>> losses = jax.jit(jax.vmap(final_loss))(jnp.logspace(-4, -1, 8))
    """
    source, accepted, build = _resolve(name)
    return optax.with_extra_args_support(build(**_validated(name, source, accepted, hyper)))


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
                                                      one_of("cross_entropy", "mse")),
                                        "order": Hyper("paper", one_of("paper", "optax"))})
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
    "graft": Hyper("adam", one_of("adam", "sgd", "none")), "graft_eps": Hyper(1e-8, positive),
    "exponent": Hyper(None, optional(positive))})
register("soap", _soap.soap, {
    "learning_rate": LEARNING_RATE, "b1": Hyper(0.95, unit_interval),
    "b2": Hyper(0.95, unit_interval), "eps": Hyper(1e-8, positive),
    "shampoo_b2": Hyper(None, optional(unit_interval)), "block_size": _BLOCK,
    "precondition_every": _EVERY, "start_preconditioning_step": Hyper(0, integer),
    "basis": Hyper("eigh", one_of("eigh", "qr"))})


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
                  batch=None, key=None, step=None, **extra_args):
        if statistics is None:
            if apply_fn is None or batch is None or key is None or params is None:
                raise ValueError("kfac needs `statistics`, or `apply_fn`, `batch`, `key` "
                                 "and `params` to compute them (train_step(..., "
                                 "apply_fn=apply_fn) supplies them).")
            statistics = _kfac.kfac_statistics(apply_fn, params, batch[0], key=key,
                                               loss=loss, num_samples=num_samples)
        return inner.update(updates, state, params, statistics=statistics, step=step)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


register("kfac", _kfac_with_statistics, {
    "learning_rate": LEARNING_RATE, "layers": Hyper(REQUIRED, _layers),
    "damping": Hyper(1e-3, positive), "decay": Hyper(0.95, unit_interval),
    "inverse_every": _EVERY, "momentum": Hyper(0.0, unit_interval),
    "tikhonov": Hyper("factored", one_of("factored", "exact")),
    "loss": Hyper("cross_entropy", one_of("cross_entropy", "mse")),
    "num_samples": Hyper(1, positive_int)})
