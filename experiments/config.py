"""Sweep configs: the typed tables, TOML loading with overrides, the grid and its groups.

A config is data (TOML), never code. A sweep config has the tables `[data]`, `[model]`,
`[optimizer]`, `[train]`, `[measure]`, `[record]` (curvature along training) and
`[sweep]`; each table is a frozen dataclass below, which holds its defaults, limits and
docs (`basin config --reference` prints them). Each key of `[sweep]` is a dotted path
into the config (shorthands: `batch_size` → `train.batch_size`, `learning_rate` →
`optimizer.learning_rate`, `seed` → `train.seed`) with a list of values, and each table
of `[[sweep.zip]]` is one axis whose lists (of equal length) advance together; the grid
is the product of all axes:

    [sweep]
    seed = [0, 1]
    [[sweep.zip]]                       # each optimizer with its own learning rates
    "optimizer.name" = ["sgd", "sgd", "adam", "adam"]
    learning_rate    = [0.1, 0.3, 0.001, 0.003]

A resolved config is plain JSON-ready data (what `config.json` stores); `load` returns
it after checking every table and every grid value.
"""

from __future__ import annotations

import copy
import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import transforms as tx
from experiments.data import sizes as dataset_sizes
from experiments.grid import (ALWAYS_VMAPPED, MAX_MEMBERS, SHORTHANDS, Member, axes,
                              check_sweep, expand, get_path, grid_size, group_key, groups,
                              set_path, swept_paths, sweep_keys, vmapped_paths)
from experiments import measures, schema
from experiments.schema import ConfigError, as_dict, build, check, option

# The grid's functions are part of this module's interface (`config.expand(cfg)`).
__all__ = ["ALWAYS_VMAPPED", "MAX_MEMBERS", "SHORTHANDS", "Config", "ConfigError", "Member",
           "axes", "expand", "get_path", "grid_size", "group_key", "groups", "load",
           "set_path", "swept_paths", "sweep_keys", "validate", "vmapped_paths"]

DEFAULT_CONFIG = "sharpness_vs_generalization"

# The names a config may ask for: the rows of the one table of measures.
MEASURES = tuple(measures.FINAL)
RECORD_MEASURES = tuple(measures.RECORDED)

Activation = Literal["relu", "tanh", "gelu", "linear"]
Positive = dict(ge=1)


@dataclass(frozen=True)
class Data:
    """The dataset: built in (`mnist1d`, `digits`, `teacher_student`), an `.npz` file, or
    arrays given to `experiments.run(..., data=ArrayData(...))` (`arrays`)."""

    name: Literal["mnist1d", "digits", "teacher_student", "npz", "arrays"] = option(
        "mnist1d", doc="which dataset")
    num_train: int | None = option(None, ge=1, doc="first examples of the training split "
                                   "used (empty: all)")
    num_test: int | None = option(None, ge=1, doc="first examples of the test split used "
                                  "(empty: all)")
    seed: int = option(0, ge=0, le=2**32 - 1, doc="teacher_student's draw; label noise")
    label_noise: float = option(0.0, ge=0, le=1, doc="fraction of training labels redrawn "
                                "uniformly (Zhang et al. 2017)")
    path: str = option("", doc="the `.npz` file (keys x_train, y_train, x_test, y_test)")

    def check(self, where):
        check(self.name != "npz" or self.path, f"{where}.path is required for name = 'npz'")


@dataclass(frozen=True)
class MLP:
    """A fully connected network."""

    name: Literal["mlp"] = "mlp"
    hidden: tuple[int, ...] = option((100, 100), **Positive, doc="hidden widths")
    activation: Activation = option("relu", doc="between layers")


@dataclass(frozen=True)
class CNN:
    """A 1-D convolutional network (`cnn_bn`: with BatchNorm, trained in train mode)."""

    name: Literal["cnn", "cnn_bn"] = "cnn"
    channels: tuple[int, ...] = option((16, 32, 32), **Positive, doc="per conv layer")
    kernel_size: int = option(5, **Positive)
    activation: Activation = "relu"


@dataclass(frozen=True)
class ResNet:
    """A 1-D residual network (`skip = false`: the same network without skips)."""

    name: Literal["resnet"] = "resnet"
    width: int = option(16, **Positive)
    depth: int = option(4, **Positive)
    kernel_size: int = option(5, **Positive)
    skip: bool = True


@dataclass(frozen=True)
class Transformer:
    """A pre-LayerNorm transformer over patches of the input signal."""

    name: Literal["transformer"] = "transformer"
    embed_dim: int = option(128, **Positive)
    num_blocks: int = option(2, **Positive)
    num_heads: int = option(4, **Positive)
    patch_size: int = option(4, **Positive)

    def check(self, where):
        check(self.embed_dim % self.num_heads == 0,
              f"{where}.num_heads must divide {where}.embed_dim ({self.embed_dim}), got "
              f"{self.num_heads}")


@dataclass(frozen=True)
class PythonModel:
    """Your own model by importable name, `factory = "package.module:function"`: an
    `nnx.Module` factory `f(rngs, **options)` or an `(init_fn, apply_fn)` pair."""

    name: Literal["python"] = "python"
    factory: str = option("", doc="`package.module:attribute` (resolved with importlib)")
    options: dict = option(factory=dict, doc="keyword arguments for the factory")

    def check(self, where):
        # Empty when the model is given in Python (experiments.run(..., model=...)).
        check(not self.factory or (self.factory.count(":") == 1
                                   and all(self.factory.split(":"))),
              f"{where}.factory must name 'package.module:attribute', got "
              f"{self.factory!r}")


Model = MLP | CNN | ResNet | Transformer | PythonModel


@dataclass(frozen=True)
class Optimizer:
    """Any name `transforms.make` knows (Basin's registry, then optax and optax.contrib);
    every other key is a hyper-parameter of it, checked against its signature."""

    OPEN = True
    name: str = option("sgd", doc="see `basin list --optimizers`")
    learning_rate: float = option(0.1, gt=0)
    schedule: Literal["constant", "cosine"] = option(
        "constant", doc="`cosine` decays the learning rate to 0 over the budget")


@dataclass(frozen=True)
class Train:
    """Mini-batch training of every member."""

    batch_size: int = option(128, **Positive)
    seed: int = option(0, ge=0, le=2**32 - 1, doc="initialization, data order, optimizer "
                       "randomness")
    steps: int = option(1000, ge=0, le=10**9, doc="budget in steps (when epochs = 0)")
    epochs: int = option(0, ge=0, le=10**6, doc="budget in epochs (overrides steps)")
    until_train_loss: float = option(0.0, ge=0, doc="stop a member once its window's mean "
                                     "loss is below this (0: never)")
    record_every: int = option(100, **Positive, le=10**9, doc="steps per window")
    loss: Literal["cross_entropy", "mse"] = "cross_entropy"
    diverge_above: float = option(100.0, gt=0, doc="a loss above this is divergence")
    l2: float = option(0.0, ge=0, doc="coefficient of ½‖w‖² added to the loss")

    def check(self, where):
        check(self.steps > 0 or self.epochs > 0, "set train.steps or train.epochs above 0")


@dataclass(frozen=True)
class Measure:
    """Measures of each member's final parameters (see `experiments.measures`)."""

    num_examples: int = option(1000, **Positive, doc="training examples measured on")
    chunk_size: int = option(1000, **Positive)
    measures: tuple[Literal[MEASURES], ...] = ("lambda_max",)
    rho: float = option(0.05, gt=0)
    adaptive_rho: float = option(0.5, gt=0)
    ascent_steps: int = option(10, **Positive)
    random_trials: int = option(8, **Positive)
    keskar_epsilon: float = option(1e-3, gt=0)
    pac_bayes_threshold: float = option(0.1, gt=0)
    lanczos_steps: int = option(20, **Positive)
    trace_probes: int = option(30, **Positive)


@dataclass(frozen=True)
class Record:
    """Curvature along training, every `every` steps (0: off)."""

    every: int = option(0, ge=0, le=10**9)
    measures: tuple[Literal[RECORD_MEASURES], ...] = ("lambda_max",)
    num_examples: int = option(1000, **Positive)
    chunk_size: int = option(1000, **Positive)
    lanczos_steps: int = option(20, **Positive)
    probes: int = option(10, **Positive)
    index_steps: int = option(80, **Positive)

    def check(self, where):
        check(len(self.measures) > 0, f"{where}.measures must not be empty")
        check("noise_scale" not in self.measures or self.num_examples > 1,
              f"{where}.num_examples must be at least 2 to record noise_scale")


@dataclass(frozen=True)
class Config:
    """A sweep study."""

    name: str = option("study", doc="names the default run directory runs/<name>-<time>")
    description: str = ""
    study: str = option("sweep", doc="`sweep`, or a study of `experiments.studies`")
    data: Data = None
    model: Model = None
    optimizer: Optimizer = None
    train: Train = None
    measure: Measure = None
    record: Record = None
    sweep: dict = option(factory=dict, doc="dotted path -> list; [[sweep.zip]] tables")

    def check(self, where):
        check_name(self.name)
        check(self.record.every % self.train.record_every == 0,
              f"record.every ({self.record.every}) must be a multiple of "
              f"train.record_every ({self.train.record_every})")


def check_name(name: str) -> None:
    """A run's name becomes a directory name: no separators, no `..`."""
    check(bool(name) and "/" not in name and "\\" not in name and name not in (".", "..")
          and not name.startswith("."),
          f"name must be a plain file name (no '/', '\\' or leading '.'), got {name!r}")


def config_path(name_or_path: str | None) -> Path:
    """A config file: a path, or the name of one shipped in `configs/`. Anything that
    looks like a path (a separator or a `.toml` suffix) must exist."""
    name = name_or_path or DEFAULT_CONFIG
    check(isinstance(name, str), f"a config is a path or a shipped name, got {name!r}")
    path = Path(name)
    if path.suffix == ".toml" or len(path.parts) > 1:
        check(path.is_file(), f"no config file {name}")
        return path
    shipped = resources.files("configs") / f"{name}.toml"
    check(shipped.is_file(), f"no config '{name}': give a .toml path or one of "
                             f"{', '.join(list_configs())}")
    return Path(str(shipped))


def list_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir()
                  if p.name.endswith(".toml"))


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML literal value (`lr=0.1`, `sweep.seed=[0,1]`, `name="x"`)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got '{text}'")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return key, value


def read(name_or_path: str | None) -> dict:
    """The raw TOML of a config (path or shipped name)."""
    path = config_path(name_or_path)
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str] = ()) -> dict:
    """`raw` with `key=value` overrides applied (`sweep.*` keys are paths themselves)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("sweep."):
            check(out.get("study", "sweep") == "sweep" or "sweep" in out,
                  f"'{key}': study '{out.get('study')}' has no [sweep] table")
            out.setdefault("sweep", {})[key[len("sweep."):]] = value
        else:  # shorthands name the sweep config's tables, not a custom study's keys
            sweep_like = "sweep" in out or out.get("study", "sweep") == "sweep"
            _set_override(out, SHORTHANDS.get(key, key) if sweep_like else key, value)
    return out


def _set_override(cfg: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        check(isinstance(node, dict), f"'{path}': '{part}' is not a table")
    node[parts[-1]] = value


def load(name_or_path: str | None = None, overrides: list[str] = (), *,
         data_sizes=None) -> dict:
    """Read a sweep config (path or shipped name), apply overrides, validate; returns the
    resolved config. `data_sizes(data_table) -> (num_train, num_test)` checks batch
    sizes against the data (default: `experiments.data.sizes`)."""
    return validate(apply_overrides(read(name_or_path), overrides), data_sizes=data_sizes)


def resolve(raw: dict) -> dict:
    """The tables of a sweep config checked and filled in with their defaults."""
    return as_dict(build(Config, raw))


def validate(cfg: dict, *, data_sizes=None, allow_large: bool = False) -> dict:
    """Check a sweep config's tables and every point of its grid; returns it resolved."""
    resolved = resolve(cfg)
    check_sweep(resolved, allow_large)
    sizes = data_sizes or _default_sizes
    seen = set()
    for member in expand(resolved):
        # Each member is checked as a config of its own: types, ranges, the data.
        member_cfg = resolve(member.config)
        n_train, _ = sizes(member_cfg["data"])
        bs = member_cfg["train"]["batch_size"]
        check(bs <= n_train, f"batch size {bs} is larger than the training set "
                             f"({n_train} examples)")
        opt = json.dumps(member_cfg["optimizer"], sort_keys=True)
        if opt not in seen:
            seen.add(opt)
            check_optimizer(member_cfg["optimizer"])
    return resolved


def _default_sizes(data_table: dict) -> tuple[int, int]:
    return dataset_sizes(data_table)


def check_optimizer(table: dict) -> None:
    """Build the optimizer once so a bad name or hyper-parameter fails before training.
    K-FAC takes its layers from the model when training starts; here a one-matrix
    stand-in supplies them."""
    hyper = {k: v for k, v in table.items() if k not in ("name", "schedule")}
    if table["name"] == "kfac":
        import jax.numpy as jnp

        hyper["layers"] = tx.find_dense_layers(lambda w, x: x @ w, jnp.zeros((2, 2)),
                                               jnp.zeros((1, 2)))
    try:
        tx.make(table["name"], **hyper)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer: {str(e).splitlines()[0]}") from None


def reference(custom: dict[str, type] | None = None) -> str:
    """The config reference (every table, key, type, default and limit) as Markdown,
    generated from the tables above: what `basin config --reference` prints. `custom`
    maps each custom study's name to its `Config` table (`experiments.studies.tables()`;
    the runner never imports the studies), each documented in a section of its own."""
    lines = ["# Config reference", "",
             "Generated from the config tables; a study's TOML overrides these defaults.",
             "", "## Sweep studies", ""] + schema.reference(Config)
    for name, table in (custom or {}).items():
        lines += [f"## Study `{name}`", ""] + schema.reference(table)
    return "\n".join(lines).rstrip() + "\n"
