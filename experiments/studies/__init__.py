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
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path
from types import ModuleType

SWEEP = "sweep"  # the default: a plain sweep with the generic report only


def names() -> list[str]:
    """The study names a config may give as `study = "..."`."""
    return [SWEEP] + sorted(m.name for m in pkgutil.iter_modules(__path__)
                            if not m.name.startswith("_"))


def get(name: str) -> ModuleType | None:
    """The module of study `name` (None for a plain sweep)."""
    from experiments.config import ConfigError

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
