"""Studies that reproduce published phenomena, one module per study.

A config names its study with the top-level key `study`. Two shapes exist:

- a **sweep study** (`SWEEP = True`): the config is an ordinary sweep config (the
  `[data]`, `[model]`, `[optimizer]`, `[train]`, `[measure]`, `[sweep]` tables) that the
  runner trains and measures as usual; the module adds `report(run_dir) -> list[str]`,
  markdown lines (and figures it saves in `run_dir`) appended to the generic report.
- a **custom study** (`SWEEP = False`): the module's `Config` is a frozen dataclass
  built on `Study` (the keys `name`, `description`, `study`) whose fields, and nested
  table dataclasses, hold every key's type, default, limits and docs in the vocabulary
  of `experiments.schema` (cross-field checks in a `check(where)` method). The shipped
  TOML gives only the values that differ from those defaults. `experiments.load`
  resolves a config against `Config` (an unknown key, a wrong type or a bad value is a
  one-line `ConfigError` naming the key), and the module computes from the resolved
  dict in `run(cfg, run_dir, log)` (storing what it finished as it goes, so an
  interrupted run keeps it), and writes its figures and markdown in
  `report(run_dir) -> list[str]`.

Every study module also has `NAME` (its config value) and a docstring that states the
claim it reproduces and cites the paper.

Helpers for custom studies: `piece(run_dir, name, compute, log)` computes one named
piece of `results.json` unless an earlier (interrupted) run already stored it, which is
all `--resume` needs, and `array_piece` does the same for a pytree of arrays (trained
parameters) in its own `.npz`; `experiments.loop.fit` is the training loop
(`train_configured` runs it with a `Train` table); `MNIST1D` and `Train` are the
`[data]` and `[train]` tables of a study that trains a network, `mnist1d(num_train,
num_test)` gives the two splits as `(inputs, labels)` pairs and
`standardized_mnist1d(num_examples)` the first training examples, standardized.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import transforms as tx
from experiments.config import check_name
from experiments.data import mnist1d as generate
from experiments.data import sizes
from experiments.loop import Fit, fit
from experiments.schema import ConfigError, check, fail, option

SWEEP = "sweep"  # the default: a plain sweep with the generic report only


def names() -> list[str]:
    """The study names a config may give as `study = "..."`."""
    return [SWEEP] + sorted(m.name for m in pkgutil.iter_modules(__path__)
                            if not m.name.startswith("_"))


def get(name: str) -> ModuleType | None:
    """The module of study `name` (None for a plain sweep)."""
    if name == SWEEP:
        return None
    if not isinstance(name, str) or name not in names():
        raise ConfigError(f"study must be one of {', '.join(names())}; got {name!r}")
    return importlib.import_module(f"experiments.studies.{name}")


def is_custom(cfg: dict) -> bool:
    module = get(cfg.get("study", SWEEP))
    return module is not None and not module.SWEEP


def save_json(path: Path, value) -> None:
    """Write `value` as JSON atomically (write a sibling, then rename), so a kill
    mid-write never leaves a truncated file behind."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    tmp.replace(path)


def load_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


RESULTS = "results.json"


MNIST1D_TRAIN, MNIST1D_TEST = sizes({"name": "mnist1d", "num_train": None,
                                     "num_test": None})


@dataclass(frozen=True)
class Study:
    """The keys every custom study's config has (a study's `Config` gives `name` and
    `study` its own name as default, through `own`)."""

    name: str = option("", doc="names the default run directory runs/<name>-<time>")
    description: str = option("", doc="one line on what the study shows")
    study: str = option("", doc="the study (`basin list`)")

    def check(self, where):
        check_name(self.name)


def own(study: str, key: str):
    """The `Study` field `key` (`name` or `study`) defaulting to the study's own name."""
    doc = {f.name: f for f in fields(Study)}[key].metadata["doc"]
    return option(study, doc=doc)


@dataclass(frozen=True)
class MNIST1D:
    """The first examples of MNIST-1D's splits (generated locally)."""

    num_train: int = option(MNIST1D_TRAIN, ge=1, le=MNIST1D_TRAIN)
    num_test: int = option(MNIST1D_TEST, ge=1, le=MNIST1D_TEST)


@dataclass(frozen=True)
class Train:
    """Mini-batch training of the study's network (`experiments.loop.fit`; data order
    from `seed + 1`)."""

    optimizer: str = option("adam", doc="any name `transforms.make` knows")
    learning_rate: float = option(1e-3, gt=0)
    steps: int = option(800, ge=1, le=10**9)
    batch_size: int = option(128, ge=1)
    seed: int = option(0, ge=0, le=2**32 - 1, doc="initialization and data order")

    def check(self, where):
        try:
            tx.make(self.optimizer, learning_rate=self.learning_rate)
        except (ValueError, TypeError) as e:
            fail(f"{where}.optimizer: {str(e).splitlines()[0]}")


def check_batch(data: MNIST1D, train: Train) -> None:
    """A `[train]` batch fits in the `[data]` training split."""
    check(train.batch_size <= data.num_train,
          f"train.batch_size ({train.batch_size}) must not exceed data.num_train "
          f"({data.num_train})")


def nonempty(table, where: str, *keys: str) -> None:
    """Each list-valued key of `table` holds at least one value."""
    for key in keys:
        check(len(getattr(table, key)) > 0, f"{where + '.' if where else ''}{key} must "
                                            "not be empty")


def tables() -> dict[str, type]:
    """Each custom study's `Config` by study name (for the config reference)."""
    return {n: m.Config for n in names()[1:] if not (m := get(n)).SWEEP}


def train_configured(cfg: dict, loss_fn: Callable, params: Any, data: tuple) -> Fit:
    """`experiments.loop.fit` with the optimizer, steps, batch size and seed of the
    config's `[train]` table (a `Train`; data order from `seed + 1`)."""
    tr = cfg["train"]
    opt = tx.make(tr["optimizer"], learning_rate=tr["learning_rate"])
    return fit(loss_fn, params, opt, data, steps=tr["steps"], batch_size=tr["batch_size"],
               key=jax.random.key(tr["seed"] + 1))


def results(run_dir: Path) -> dict:
    """Everything a custom study stored so far in `run_dir/results.json`."""
    return load_json(Path(run_dir) / RESULTS, {})


def piece(run_dir: Path, name: str, compute: Callable[[], Any], log=None) -> Any:
    """The piece `name` of `run_dir/results.json`: read back if a previous run stored
    it, else `compute()`d (JSON-serializable), stored at once and returned."""
    path = Path(run_dir) / RESULTS
    done = load_json(path, {})
    if name in done:
        if log is not None:
            log(f"{name}: already stored, skipped")
        return done[name]
    value = compute()
    done = load_json(path, {})   # re-read: keep whatever else was stored meanwhile
    done[name] = value
    save_json(path, done)
    return value


def array_piece(run_dir: Path, name: str, compute: Callable[[], Any], like: Any,
                log=None) -> Any:
    """Like `piece` for a pytree of arrays shaped like `like`, kept in
    `run_dir/<name>.npz` (leaves in `jax.tree.leaves` order)."""
    path = Path(run_dir) / f"{name}.npz"
    leaves, treedef = jax.tree.flatten(like)
    if path.is_file():
        with np.load(path) as f:
            stored = [f[f"arr_{i}"] for i in range(len(f.files))]
        if [a.shape for a in stored] == [np.shape(a) for a in leaves]:
            if log is not None:
                log(f"{name}: already stored, loaded")
            return jax.tree.unflatten(treedef, [jnp.asarray(a) for a in stored])
    value = compute()
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, *[np.asarray(a) for a in jax.tree.leaves(value)])
    tmp.replace(path)
    return value


def mnist1d(num_train: int, num_test: int) -> tuple[tuple, tuple]:
    """The first `num_train` / `num_test` examples of MNIST-1D's splits (generated
    locally), as `(inputs, labels)` pairs of jax arrays."""
    data = generate()
    check(0 < num_train <= len(data.y_train) and 0 < num_test <= len(data.y_test),
          f"data.num_train must be in 1..{len(data.y_train)} and data.num_test in "
          f"1..{len(data.y_test)}; got {num_train} and {num_test}")
    return ((jnp.asarray(data.x_train[:num_train]), jnp.asarray(data.y_train[:num_train])),
            (jnp.asarray(data.x_test[:num_test]), jnp.asarray(data.y_test[:num_test])))


def standardized_mnist1d(num_examples: int) -> tuple:
    """The first `num_examples` MNIST-1D training examples, each input feature
    standardized over them, as `(inputs, labels)` jax arrays (inputs float32)."""
    d = generate()
    x = d.x_train[:num_examples]
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return jnp.asarray(x, jnp.float32), jnp.asarray(d.y_train[:num_examples])
