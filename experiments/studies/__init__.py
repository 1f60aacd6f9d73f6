"""Studies that reproduce published phenomena, one module per study.

A config names its study with the top-level key `study`. Two shapes exist:

- a **sweep study** (`SWEEP = True`): the config is an ordinary sweep config (the
  `[data]`, `[model]`, `[optimizer]`, `[train]`, `[measure]`, `[sweep]` tables) that the
  runner trains and measures as usual; the module adds `report(run_dir) -> list[str]`,
  markdown lines (and figures it saves in `run_dir`) appended to the generic report.
- a **custom study** (`SWEEP = False`): the module owns its config tables (`DEFAULTS`,
  merged under the file; unknown keys are errors), checks them in `validate(cfg)`,
  computes in `run(cfg, run_dir, log)` (storing what it finished as it goes, so an
  interrupted run keeps it), and writes its figures and markdown in
  `report(run_dir) -> list[str]`.

Every study module also has `NAME` (its config value) and a docstring that states the
claim it reproduces and cites the paper.

Helpers for custom studies: `piece(run_dir, name, compute, log)` computes one named
piece of `results.json` unless an earlier (interrupted) run already stored it, which is
all `--resume` needs, and `array_piece` does the same for a pytree of arrays (trained
parameters) in its own `.npz`; `experiments.loop.fit` is the training loop (and
`train_configured` runs it with a `[train]` table); `mnist1d(num_train, num_test)` gives the two splits as
`(inputs, labels)` pairs; `check(cond, message)` raises `ConfigError` for `validate`.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from experiments.loop import Fit, fit

from experiments.schema import ConfigError

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


def check(cond: bool, message: str) -> None:
    """For a custom study's `validate`: raise `ConfigError(message)` unless `cond`."""
    if not cond:
        raise ConfigError(message)


def number(x) -> bool:
    """A real number (not a bool), for `validate` checks."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def integer(x, low: int = 1) -> bool:
    """An int (not a bool) of at least `low`, for `validate` checks."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def positive(x) -> bool:
    """A number > 0, for `validate` checks."""
    return number(x) and x > 0


def positive_int(table: dict, *keys: str) -> None:
    """Check that each of `keys` in a config `table` is an integer > 0."""
    for key in keys:
        check(integer(table[key]), f"{key} must be a positive integer, got {table[key]!r}")


def positive_number(table: dict, *keys: str) -> None:
    """Check that each of `keys` in a config `table` is a number > 0."""
    for key in keys:
        check(positive(table[key]), f"{key} must be a number > 0, got {table[key]!r}")


def check_training(cfg: dict) -> None:
    """Check the `[data]` (num_train, num_test) and `[train]` (steps, batch_size, seed,
    optimizer, learning_rate) tables a custom study trains a network with."""
    import transforms as tx

    for key in ("num_train", "num_test"):
        check(integer(cfg["data"][key]), f"data.{key} must be a positive integer")
    tr = cfg["train"]
    for key in ("steps", "batch_size"):
        check(integer(tr[key]), f"train.{key} must be a positive integer, got {tr[key]!r}")
    check(integer(tr["seed"], 0), "train.seed must be a non-negative integer")
    check(tr["batch_size"] <= cfg["data"]["num_train"],
          "train.batch_size must not exceed data.num_train")
    try:
        tx.make(tr["optimizer"], learning_rate=tr["learning_rate"])
    except (ValueError, TypeError) as e:
        check(False, f"train: {e}")


def train_configured(cfg: dict, loss_fn: Callable, params: Any, data: tuple) -> Fit:
    """`experiments.loop.fit` with the optimizer, steps, batch size and seed of the
    `[train]` table that `check_training` checks (data order from `seed + 1`)."""
    import jax
    import transforms as tx

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
    import jax
    import jax.numpy as jnp
    import numpy as np

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
    import jax.numpy as jnp

    from experiments.data import mnist1d as generate

    data = generate()
    check(0 < num_train <= len(data.y_train) and 0 < num_test <= len(data.y_test),
          f"data.num_train must be in 1..{len(data.y_train)} and data.num_test in "
          f"1..{len(data.y_test)}; got {num_train} and {num_test}")
    return ((jnp.asarray(data.x_train[:num_train]), jnp.asarray(data.y_train[:num_train])),
            (jnp.asarray(data.x_test[:num_test]), jnp.asarray(data.y_test[:num_test])))
