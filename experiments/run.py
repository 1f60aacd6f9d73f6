"""`experiments.run`: read a config, prepare its run directory, dispatch it.

A config's top-level `study` picks what runs it: `sweep` (and the sweep studies) go to
the runner (`experiments.sweep`), which trains the grid group by group; a custom study
of `experiments.studies` runs itself. This module is the only one that knows both; the
runner never imports the studies.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from experiments import config as cfglib
from experiments import report as reportlib
from experiments import rundir, schema, studies, sweep
from experiments.data import ArrayData, sizes
from experiments.schema import ConfigError

__all__ = ["load", "run", "validate", "write_report"]


def _custom(cfg: dict):
    """The module of a custom study, or None for the runner."""
    module = studies.get(cfg.get("study", "sweep") if isinstance(cfg, dict) else "sweep")
    return module if module is not None and not module.SWEEP else None


def validate(cfg: dict, *, arrays: ArrayData | None = None,
             allow_large: bool = False) -> dict:
    """A config (raw or resolved) checked and resolved, whatever its study."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"a config is a table, got {type(cfg).__name__}")
    module = _custom(cfg)
    if module is not None:
        return schema.as_dict(schema.build(module.Config, cfg))
    return cfglib.validate(cfg, data_sizes=lambda table: sizes(table, arrays),
                           allow_large=allow_large)


def load(name_or_path: dict | str | None = None, overrides: list[str] = (), *,
         arrays: ArrayData | None = None, allow_large: bool = False) -> dict:
    """Read a config (a path, a shipped name or a dict of raw tables), apply `key=value`
    overrides and validate it; returns the resolved config (plain data, what
    `config.json` stores).

    Example:
      >>> cfg = experiments.load("large_batch", ["train.steps=300"])
      >>> cfg["sweep"]
    """
    raw = name_or_path if isinstance(name_or_path, dict) else cfglib.read(name_or_path)
    raw = cfglib.apply_overrides(raw, list(overrides))
    return validate(raw, arrays=arrays, allow_large=allow_large)


def _with_python_objects(cfg: dict, model: Any, data: Any) -> dict:
    """A raw config whose model or data is given as a Python object names it so."""
    cfg = json.loads(json.dumps(cfg))
    if model is not None:
        cfg["model"] = {"name": "python"}
    if data is not None:
        cfg.setdefault("data", {})
        cfg["data"] = {k: v for k, v in cfg["data"].items()
                       if k in ("num_train", "num_test", "seed", "label_noise")}
        cfg["data"]["name"] = "arrays"
    return cfg


def run(config: dict | str | None = None, *, model: Any = None,
        data: ArrayData | None = None, overrides: list[str] = (),
        out: str | Path | None = None, resume: str | Path | None = None,
        add: bool = False, progress: bool | str = False, log=None,
        allow_large: bool = False) -> sweep.Results:
    """Run a study and return its `Results`; the Python API under `basin run`.

    Args:
      config: a config dict (raw TOML tables or resolved), a config path or a shipped
        name (None: the default study).
      model: your own model instead of the `[model]` table: an `nnx.Module` factory
        `f(rngs)` or a pair `(init_fn(key, example_inputs), apply_fn(params, inputs))`.
      data: your own arrays instead of the `[data]` table: `ArrayData(x_train, y_train,
        x_test, y_test)` (integer labels classify; float targets need `loss = "mse"`).
      overrides: `key=value` strings applied on top (as `basin run --set`).
      out: the run directory (default `runs/<name>-<timestamp>`).
      resume: an existing run directory: finished groups are skipped (pass the same
        `model` and `data` again if the run was given Python objects).
      add: add this sweep's groups to an `out` that holds another sweep of the same
        study over the same keys (`basin run --add`).
      progress: True or "bar" for progress bars, "lines" for one line per window.
      allow_large: run a grid above `config.MAX_MEMBERS` members.

    Example:
      >>> res = experiments.run({"train": {"steps": 200}, "sweep": {"seed": [0, 1]}},
      ...                       model=(init_fn, apply_fn), data=ArrayData(x, y, xt, yt))
      >>> res.records()[0]["lambda_max"]
    """
    log = log or (lambda msg: None)
    cfg = None
    if resume is None:
        raw = config if isinstance(config, dict) else cfglib.read(config)
        cfg = load(_with_python_objects(raw, model, data), overrides, arrays=data,
                   allow_large=allow_large)
        if add and _custom(cfg) is not None:
            raise rundir.RunDirError(f"--add extends a sweep; the custom study "
                                     f"'{cfg['study']}' writes one run of its own")
        # Everything that can fail is checked before a directory exists.
        datasets = None if _custom(cfg) is not None else sweep.preflight(cfg, model, data)
    with rundir.prepare(cfg, validate=lambda c: validate(c, arrays=data, allow_large=True),
                        out=out, resume=resume, add=add, log=log) as rd:
        if resume is not None:
            cfg = rd.cfg
            datasets = None if _custom(cfg) is not None else sweep.preflight(cfg, model, data)
        module = _custom(cfg)
        if module is not None:
            module.run(cfg, rd.path, log)
            return sweep.Results(rd.path)
        return sweep.run_sweep(cfg, rd.path, model=model, arrays=data, progress=progress,
                               log=log, datasets=datasets, mixed=rd.mixed)


def write_report(run_dir: str | Path) -> Path:
    """Write `report.md` (and figures) for a run directory and return its path; the
    Python API under `basin report`. The stored config is validated as a new one is;
    a custom study writes its own report, a sweep study adds its section to the
    sweep's.

    Example:
      >>> res = experiments.run({"train": {"steps": 20}}, model=(init_fn, apply_fn),
      ...                       data=ArrayData(x_train, y_train, x_test, y_test))
      >>> experiments.write_report(res.path).read_text()[:40]
    """
    path = Path(run_dir)
    if path.is_dir():
        rundir.check_links(path)
    cfg = rundir.read_config(path, lambda c: validate(c, allow_large=True))
    module = studies.get(cfg.get("study", studies.SWEEP))
    if module is not None and not module.SWEEP:
        return reportlib.write_lines(path, cfg, module.report(path))
    extra = module.report(path) if module is not None else []
    return reportlib.write_sweep_report(path, cfg, extra)

