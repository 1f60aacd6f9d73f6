"""One table of measures: what the runner can measure at the end of training and along it.

`FINAL` lists the measures of a trained member (`[measure] measures = [...]`), `RECORDED`
those taken at record steps inside the group program (`[record] measures = [...]`).
Config validation reads the names, the programs read the functions, the report reads
`curvature` and `label`: nothing else lists them. Each entry says which settings
(attributes of the `[measure]` or `[record]` table) its function reads.

Every function takes a `Site` (the member's parameters, its loss, the measuring subset,
the Hessian operator on it, a key; along training also the optimizer's state and
hyper-parameters) and the settings, and returns a scalar, or, for a recorded family
such as `grad_norms`, a dict of scalars named `<name>/<part>`.

Example:
  >>> program = make_measure_program(apply_fn, loss_fn, settings, train, test)
  >>> program(stacked_params, jax.random.key(0))["lambda_max"]   # (M,)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import landscape as ls
import transforms as tx


class Site(NamedTuple):
    """Where a measure is taken: one member's parameters and everything around them."""

    loss_fn: Callable
    params: Any
    batch: Any          # the measuring subset of the training set
    hessian: Any        # ls.hessian(loss_fn, params, batch, chunk_size=...)
    key: jax.Array
    # The extreme Hessian eigenvalues from one Lanczos run, shared by lambda_max and
    # lambda_min when both are recorded (None when neither is).
    extremes: jax.Array | None = None
    # Along training: the member's optimizer state and the keyword arguments its
    # optimizer was built with (for the measures that read the preconditioner).
    opt_state: Any = None
    optimizer: dict | None = None
    apply_fn: Callable | None = None   # the model (at the end of training)


class Measure(NamedTuple):
    """One entry of the table."""

    fn: Callable[[Site, Any], Any]
    description: str
    label: str               # axis label in the report
    curvature: bool          # the report sets it against the generalization gap
    reads: tuple[str, ...]   # the settings attributes `fn` uses


@dataclass(frozen=True)
class MeasureSettings:
    """The end-of-training `[measure]` table as the measure program reads it (any object
    with these attributes will do, e.g. the config's own table)."""

    measures: tuple[str, ...]
    num_examples: int
    chunk_size: int
    rho: float
    adaptive_rho: float
    ascent_steps: int
    random_trials: int
    keskar_epsilon: float
    pac_bayes_threshold: float
    lanczos_steps: int
    trace_probes: int


@dataclass(frozen=True)
class RecordSettings:
    """The `[record]` table (curvature along training); `every = 0` turns it off."""

    every: int
    measures: tuple[str, ...]
    num_examples: int
    chunk_size: int
    lanczos_steps: int
    probes: int
    index_steps: int


def _sub(site: Site, s) -> dict:
    return dict(key=site.key, chunk_size=s.chunk_size)


def _path_norm(site: Site, s) -> jax.Array:
    """Σ f_{θ²}(1): the network with every parameter squared applied to an all-ones
    input, summed over outputs; for a ReLU MLP the sum over input-output paths of the
    squared weight products (Neyshabur et al. 2015; Jiang et al. 2019's path.norm)."""
    squared = jax.tree.map(jnp.square, site.params)
    ones = jnp.ones((1,) + site.batch[0].shape[1:], site.batch[0].dtype)
    return jnp.sum(site.apply_fn(squared, ones))


FINAL: dict[str, Measure] = {
    "lambda_max": Measure(
        lambda site, s: ls.eigenvalues(site.hessian, k=1, key=site.key,
                                       num_steps=s.lanczos_steps).values[0],
        "largest Hessian eigenvalue (Lanczos)", "λ_max of the Hessian", True,
        ("lanczos_steps",)),
    "trace": Measure(
        lambda site, s: ls.trace(site.hessian, key=site.key,
                                 num_probes=s.trace_probes).value,
        "Hessian trace (Hutch++)", "trace of the Hessian", True, ("trace_probes",)),
    "worst_case": Measure(
        lambda site, s: ls.sharpness.worst_case(
            site.loss_fn, site.params, site.batch, rho=s.rho, num_steps=s.ascent_steps,
            **_sub(site, s)).value,
        "worst-case loss increase in a ρ-ball (projected ascent)",
        "worst-case ρ-sharpness", True, ("rho", "ascent_steps", "chunk_size")),
    "adaptive": Measure(
        lambda site, s: ls.sharpness.adaptive(
            site.loss_fn, site.params, site.batch, rho=s.adaptive_rho,
            num_steps=s.ascent_steps, **_sub(site, s)).value,
        "scale-invariant worst-case sharpness (Kwon et al. 2021)", "adaptive sharpness",
        True, ("adaptive_rho", "ascent_steps", "chunk_size")),
    "random": Measure(
        lambda site, s: ls.sharpness.random(
            site.loss_fn, site.params, site.batch, rho=s.rho, num_trials=s.random_trials,
            **_sub(site, s)).mean,
        "mean loss increase under random ρ-perturbations", "random sharpness", True,
        ("rho", "random_trials", "chunk_size")),
    "keskar": Measure(
        lambda site, s: ls.sharpness.keskar(
            site.loss_fn, site.params, site.batch, epsilon=s.keskar_epsilon,
            num_steps=s.ascent_steps, **_sub(site, s)).value,
        "Keskar et al. 2017 ε-sharpness", "Keskar ε-sharpness", True,
        ("keskar_epsilon", "ascent_steps", "chunk_size")),
    "pac_bayes": Measure(
        lambda site, s: ls.sharpness.pac_bayes(
            site.loss_fn, site.params, site.batch, threshold=s.pac_bayes_threshold,
            **_sub(site, s)).flatness,
        "PAC-Bayes flatness 1/σ² (Jiang et al. 2019)", "PAC-Bayes flatness 1/σ²", True,
        ("pac_bayes_threshold", "chunk_size")),
    "pac_bayes_magnitude": Measure(
        lambda site, s: ls.sharpness.pac_bayes(
            site.loss_fn, site.params, site.batch, threshold=s.pac_bayes_threshold,
            magnitude_aware=True, **_sub(site, s)).flatness,
        "magnitude-aware PAC-Bayes flatness 1/σ'² (Jiang et al. 2019)",
        "magnitude-aware PAC-Bayes 1/σ'²", True, ("pac_bayes_threshold", "chunk_size")),
    "fisher_rao": Measure(
        lambda site, s: ls.sharpness.fisher_rao_norm(site.loss_fn, site.params, site.batch,
                                                     chunk_size=s.chunk_size),
        "Fisher-Rao norm (Liang et al. 2019)", "Fisher-Rao norm", True, ("chunk_size",)),
    "param_norm": Measure(
        lambda site, s: optax.tree.norm(site.params, squared=True),
        "squared parameter norm ‖θ‖² (a baseline)", "‖θ‖²", True, ()),
    "path_norm": Measure(
        _path_norm, "path norm Σ f_{θ²}(1) (ReLU networks; a baseline)", "path norm",
        True, ()),
    "noise_scale": Measure(
        lambda site, s: ls.gradient_noise_scale(site.loss_fn, site.params, site.batch,
                                                chunk_size=s.chunk_size).simple,
        "gradient noise scale B_simple (McCandlish et al. 2018)",
        "gradient noise scale", True, ("chunk_size",)),
}

def _preconditioned_lambda_max(site: Site, s) -> jax.Array:
    """λ₁(P⁻¹H), P from the optimizer state (NaN before the first step, where Adam's
    bias-corrected second moment is 0/0)."""
    if site.opt_state is None:
        raise ValueError("preconditioned_lambda_max needs the optimizer state: it is "
                         "recorded along training only.")
    lam = tx.preconditioned_lambda_max(
        site.loss_fn, site.params, site.batch, site.opt_state,
        key=jax.random.fold_in(site.key, 2), num_steps=max(s.lanczos_steps, 2),
        chunk_size=s.chunk_size, built_with=site.optimizer)
    return jnp.where(jnp.isfinite(lam), lam, jnp.nan)


RECORDED: dict[str, Measure] = {
    "lambda_max": Measure(lambda site, s: jnp.max(site.extremes),
                          "largest Hessian eigenvalue (Lanczos)", "λ_max", True,
                          ("lanczos_steps",)),
    "lambda_min": Measure(lambda site, s: jnp.min(site.extremes),
                          "smallest Hessian eigenvalue (same Lanczos run as λ_max)",
                          "λ_min", True, ("lanczos_steps",)),
    # Too few steps smear the mass of near-zero eigenvalues, common in networks, onto
    # Ritz values on both sides of the band and inflate the index.
    "index": Measure(
        lambda site, s: ls.hessian_index(
            site.hessian, key=jax.random.split(site.key)[1], num_probes=s.probes,
            num_steps=s.index_steps).negative,
        "fraction of Hessian eigenvalues below −10⁻³·max|λ| (spectral density)",
        "Hessian index", True, ("probes", "index_steps")),
    "grad_norms": Measure(
        lambda site, s: {f"grad_norm/{layer}": v for layer, v in ls.layer_grad_norms(
            site.loss_fn, site.params, site.batch).norms.items()},
        "per-layer norms of the full-subset gradient", "gradient norm", False, ()),
    "noise_scale": Measure(FINAL["noise_scale"].fn, FINAL["noise_scale"].description,
                           "gradient noise scale", True, ("chunk_size",)),
    # Cohen et al. 2022: full-batch Adam hovers at (2 + 2β₁)/((1 − β₁)η), 38/η at β₁ 0.9.
    "preconditioned_lambda_max": Measure(
        _preconditioned_lambda_max,
        "largest eigenvalue of P⁻¹H, P the optimizer's preconditioner (Adam: √v̂ + ε)",
        "λ₁(P⁻¹H)", True, ("lanczos_steps", "chunk_size")),
}

# Measured for every member whatever the config asks: fit and generalization.
ALWAYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "gap",
          "accuracy_gap")

LABELS = {name: m.label for name, m in FINAL.items()}
CURVATURE = tuple(name for name, m in FINAL.items() if m.curvature)


def _extremes(site: Site, s, names) -> jax.Array | None:
    ends = {"lambda_max", "lambda_min"} & set(names)
    if not ends:
        return None
    which = "both" if len(ends) == 2 else ("top" if "lambda_max" in ends else "bottom")
    return ls.eigenvalues(site.hessian, k=1, key=jax.random.split(site.key)[0],
                          which=which, num_steps=max(s.lanczos_steps, 2)).values


def _collect(table: dict, site: Site, settings, names) -> dict:
    out = {}
    for name in names:
        value = table[name].fn(site, settings)
        out.update(value if isinstance(value, dict) else {name: value})
    return out


def make_recorder(loss_fn: Callable, settings, x: jax.Array, y: jax.Array,
                  optimizer: dict | None = None) -> Callable[..., dict]:
    """`record(params, key, opt_state=None, hyper=None) -> {name: float32 scalar}` for
    one member on the first `settings.num_examples` training examples (the same ones at
    every record), for the `RECORDED` measures named in `settings.measures`.

    `optimizer` holds the keyword arguments every member's optimizer was built with and
    `hyper` one member's own (vmapped) ones; with `opt_state` they are what
    `preconditioned_lambda_max` reads (`transforms.preconditioner(..., built_with=)`)."""
    names = [n for n in RECORDED if n in set(settings.measures)]
    n = min(settings.num_examples, x.shape[0])
    sub = (x[:n], y[:n])

    def record(params, key, opt_state=None, hyper=None):
        hessian = ls.hessian(loss_fn, params, sub, chunk_size=settings.chunk_size)
        site = Site(loss_fn, params, sub, hessian, key, opt_state=opt_state,
                    optimizer={**(optimizer or {}), **(hyper or {})})
        site = site._replace(extremes=_extremes(site, settings, names))
        return {k: v.astype(jnp.float32) for k, v in
                _collect(RECORDED, site, settings, names).items()}

    return record


def make_measure_program(apply_fn: Callable, loss_fn: Callable, settings, train: tuple,
                         test: tuple) -> Callable:
    """`program(stacked_params, key) -> dict name -> (M,) array`, jitted: the `ALWAYS`
    measures plus the `FINAL` ones named in `settings.measures`, on the first
    `settings.num_examples` training examples. Members run one after another
    (`lax.map`), so memory is that of one member's curvature computation."""
    names = tuple(settings.measures)
    chunk = settings.chunk_size
    sub = jax.tree.map(lambda a: a[: settings.num_examples], train)

    def fit(params, data):
        loss = ls.chunk_mean(lambda b, i: loss_fn(params, b), data, chunk)
        acc = ls.chunk_mean(lambda b, i: ls.accuracy(apply_fn(params, b[0]), b[1]), data,
                            chunk)
        return loss, acc

    def one(args):
        params, key = args
        out = {}
        out["train_loss"], out["train_accuracy"] = fit(params, train)
        out["test_loss"], out["test_accuracy"] = fit(params, test)
        out["gap"] = out["test_loss"] - out["train_loss"]
        out["accuracy_gap"] = out["train_accuracy"] - out["test_accuracy"]
        site = Site(loss_fn, params, sub, ls.hessian(loss_fn, params, sub, chunk_size=chunk),
                    key, apply_fn=apply_fn)
        out.update(_collect(FINAL, site, settings, [n for n in FINAL if n in names]))
        return out

    @jax.jit
    def program(stacked_params, key):
        m = jax.tree.leaves(stacked_params)[0].shape[0]
        return jax.lax.map(one, (stacked_params, jax.random.split(key, m)))

    return program
