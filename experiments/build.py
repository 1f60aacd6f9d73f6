"""Every model the runner trains, as `Model(apply_fn, init)`.

A model comes from a config's `[model]` table (the built-in architectures of
`experiments.models`, or `name = "python"` with an importable `factory`) or from Python
(`experiments.run(..., model=...)`):

- an `nnx.Module` factory `f(rngs: nnx.Rngs) -> nnx.Module` (made pure with
  `experiments.models.pure`; a BatchNorm model trains in train mode), or
- a pair `(init_fn(key, example_inputs) -> params, apply_fn(params, inputs) -> outputs)`:
  plain JAX, Flax Linen (`lambda k, x: module.init(k, x)`, `module.apply`) or Equinox
  (`eqx.partition` the model into params and static parts; `apply_fn` combines them).

Example:
  >>> import equinox as eqx
  >>> static = eqx.partition(eqx.nn.MLP(40, 10, 64, 2, key=jax.random.key(0)),
  ...                        eqx.is_array)[1]
  >>> def init_fn(key, x):
  ...     return eqx.partition(eqx.nn.MLP(40, 10, 64, 2, key=key), eqx.is_array)[0]
  >>> def apply_fn(params, x):
  ...     return jax.vmap(eqx.combine(params, static))(x)
  >>> model = as_model((init_fn, apply_fn), x_train[:1])
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, NamedTuple

import jax
from flax import nnx

from experiments.models import CNN1D, MLP, ResNet1D, Transformer1D
from experiments.state import has_batch_norm, pure
from experiments.schema import ConfigError


class Model(NamedTuple):
    """A model as pure functions: `apply_fn(params, inputs)` and `init(key) -> params`."""

    apply_fn: Callable
    init: Callable


def resolve(name: str) -> Any:
    """The object an importable name `package.module:attribute` refers to (importlib, as
    Hydra resolves `_target_`; nothing is evaluated)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model.factory must be 'package.module:attribute', got {name!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # an import error of the user's module, whatever its type
        raise ConfigError(f"model.factory {name!r}: cannot import {module_name!r} "
                          f"({type(e).__name__}: {_first_line(e)})"
                          ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"model.factory {name!r}: {module_name!r} has no attribute "
                              f"{attr!r}")
        obj = getattr(obj, part)
    return obj


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _is_pair(obj) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(map(callable, obj))


def as_model(spec: Any, example_inputs: Any, *, where: str = "model",
             mode: str | None = None) -> Model:
    """`spec` (an NNX factory or an `(init_fn, apply_fn)` pair) as a `Model` whose
    `init(key)` draws parameters for inputs shaped like `example_inputs`."""
    if _is_pair(spec):
        init_fn, apply_fn = spec
        return Model(apply_fn, lambda key: init_fn(key, example_inputs))
    if not callable(spec):
        raise ConfigError(f"{where} must be an nnx.Module factory f(rngs) or a pair "
                          f"(init_fn, apply_fn); got {type(spec).__name__}")
    try:
        made = spec(nnx.Rngs(0))
    except Exception as e:  # the user's factory raised, whatever its type
        raise ConfigError(f"{where}: the factory failed on nnx.Rngs(0): "
                          f"{type(e).__name__}: {_first_line(e)}") from None
    if _is_pair(made):
        return as_model(made, example_inputs, where=where)
    if not isinstance(made, nnx.Module):
        raise ConfigError(f"{where}: the factory returned {type(made).__name__}, not an "
                          "nnx.Module or an (init_fn, apply_fn) pair")
    mode = mode or ("train" if has_batch_norm(made) else None)
    apply_fn, _ = pure(made, mode=mode)
    return Model(apply_fn, lambda key: pure(spec(nnx.Rngs(key)), mode=mode)[1])


def check_outputs(model: Model, example_inputs: Any, targets: Any, num_classes: int | None,
                  where: str = "model") -> None:
    """The model's outputs must fit the targets: `(N, C)` with C >= num_classes for
    labels, the targets' per-example shape for float targets."""
    try:
        params = jax.eval_shape(model.init, jax.random.key(0))
        out = jax.eval_shape(model.apply_fn, params, example_inputs)
    except Exception as e:  # the user's code failed on the example batch
        raise ConfigError(f"{where} fails on inputs of shape {example_inputs.shape}: "
                          f"{type(e).__name__}: {_first_line(e)}"
                          ) from None
    if not hasattr(out, "shape"):
        raise ConfigError(f"{where} must return one array; got {type(out).__name__}")
    n = example_inputs.shape[0]
    if num_classes is not None:
        if out.ndim != 2 or out.shape[0] != n or out.shape[1] < num_classes:
            raise ConfigError(f"{where} outputs shape {out.shape} for {n} examples; "
                              f"classification needs ({n}, >= {num_classes})")
    elif out.shape[0] != n or out.size != targets[:n].size:
        raise ConfigError(f"{where} outputs shape {out.shape} but the targets of {n} "
                          f"examples have shape {targets[:n].shape}")


def builtin(table: dict, example_inputs: Any, num_outputs: int) -> Model:
    """The built-in architecture a `[model]` table names, or its python `factory`."""
    name = table["name"]
    if name == "python":
        spec = resolve(table["factory"])
        if table.get("options"):
            if not callable(spec):
                raise ConfigError("model.options needs a callable factory")
            spec = functools.partial(spec, **table["options"])
        return as_model(spec, example_inputs, where=f"model.factory {table['factory']!r}")
    features = int(example_inputs.reshape(example_inputs.shape[0], -1).shape[1])
    factories = {
        "mlp": lambda rngs: MLP((features, *table["hidden"], num_outputs),
                                activation=table["activation"], rngs=rngs),
        "cnn": lambda rngs: CNN1D(num_outputs, tuple(table["channels"]),
                                  kernel_size=table["kernel_size"],
                                  activation=table["activation"],
                                  batch_norm=name == "cnn_bn", rngs=rngs),
        "transformer": lambda rngs: Transformer1D(
            num_outputs, length=features, patch_size=table["patch_size"],
            dim=table["embed_dim"], depth=table["num_blocks"],
            num_heads=table["num_heads"], rngs=rngs),
        "resnet": lambda rngs: ResNet1D(num_outputs, width=table["width"],
                                        depth=table["depth"],
                                        kernel_size=table["kernel_size"],
                                        skip=table["skip"], rngs=rngs),
    }
    factories["cnn_bn"] = factories["cnn"]
    # Built-in models train and are measured in train mode (batch statistics for
    # BatchNorm; see docs/guides/models.md): the function SGD optimizes.
    return as_model(factories[name], example_inputs, mode="train")
