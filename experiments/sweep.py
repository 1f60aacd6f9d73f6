"""Run a study: expand the grid, train each group as one program, measure, store.

Groups (members that share shapes) run one after another; inside a group the members
are one `vmap`, and the member axis is sharded over every local device
(`jax.sharding.Mesh` + `NamedSharding`), so the same code runs on one CPU, on simulated
CPU devices and on GPUs. Under `jax.distributed` each process sees its own local
devices and runs its share of the groups (process i takes every P-th group) into the
same run directory's store, which SQLite serializes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import transforms as tx
from experiments import build
from experiments import config as cfglib
from experiments import data as datalib
from experiments import interrupt, rundir
from experiments.measures import MeasureSettings, RecordSettings, make_measure_program
from experiments.program import (
    CONVERGED,
    DIVERGED,
    GroupOutput,
    Settings,
    make_group_program,
    member_mesh,
    padded_size,
    shard_members,
)
from experiments.progress import WindowProgress
from experiments.store import Store
from experiments.train import build_optimizer, loss_function


@dataclass
class Results:
    """A run directory: its resolved config and its results store."""

    path: Path

    @property
    def config(self) -> dict:
        return rundir.read_config(self.path)

    def records(self) -> list[dict]:
        """One dict per member: the swept values, status, steps and every measure."""
        with Store(self.path / "results.sqlite") as store:
            return store.records()

    def curves(self, name: str = "train_loss") -> dict[int, list[tuple[int, float]]]:
        with Store(self.path / "results.sqlite") as store:
            return store.curves(name)

    def timings(self) -> list[dict]:
        """Per group: seconds in all, compiling, training and measuring."""
        with Store(self.path / rundir.STORE) as store:
            return store.timings()

    def summary(self) -> dict:
        """A custom study's results (`results.json`, see `experiments.studies`)."""
        path = self.path / "results.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def to_dataframe(self):
        """The records as a pandas DataFrame (needs pandas, which Basin does not require)."""
        import pandas as pd

        return pd.DataFrame(self.records())


def _status_name(code: int, target: float) -> str:
    if code == DIVERGED:
        return "diverged"
    if code == CONVERGED:
        return "converged"
    return "unconverged" if target > 0 else "finished"


class GroupResult(NamedTuple):
    """What `run_group` returns; its first three fields unpack as before."""

    rows: list[dict]          # one per member (see `_member_rows`)
    seconds: float            # compile + train + measure
    compile_seconds: float    # the group program's compilation
    train_seconds: float      # the group program's execution
    measure_seconds: float    # the end-of-training measures (compiled once per study)


def _table(cls, table: dict):
    """A config table as the typed settings `cls` (lists become tuples)."""
    return cls(**{f.name: tuple(table[f.name]) if isinstance(table[f.name], list)
                  else table[f.name] for f in dataclasses.fields(cls)})


def group_settings(train_cfg: dict, record_cfg: dict | None, num_train: int) -> Settings:
    """The group program's `Settings` from the `[train]` and `[record]` tables."""
    batch_size = train_cfg["batch_size"]
    steps = (train_cfg["epochs"] * (num_train // batch_size) if train_cfg["epochs"] > 0
             else train_cfg["steps"])
    record = (_table(RecordSettings, record_cfg)
              if record_cfg is not None and record_cfg["every"] > 0 else None)
    return Settings(steps=steps, batch_size=batch_size,
                    record_every=train_cfg["record_every"],
                    until_train_loss=float(train_cfg["until_train_loss"]),
                    diverge_above=float(train_cfg["diverge_above"]), loss=train_cfg["loss"],
                    l2=float(train_cfg.get("l2", 0.0)), record=record)


def _progress_mode(progress) -> str | None:
    if progress in (True, "bar"):
        return "bar"
    return progress or None


def _member_rows(cfg: dict, members, settings: Settings, out: GroupOutput,
                 measures: dict) -> list[dict]:
    status, taken, curve = (np.asarray(a) for a in jax.device_get(
        (out.status, out.steps, out.curve)))
    windows = {"train_loss": curve, "test_loss": np.asarray(out.test_loss),
               "test_accuracy": np.asarray(out.test_accuracy)}
    records = {k: np.asarray(v) for k, v in jax.device_get(out.records).items()}
    at, every = settings.record_steps(), settings.record_every
    ends = [min((r + 1) * every, settings.steps) for r in range(curve.shape[1])]
    rows = []
    for i, mb in enumerate(members):
        name = _status_name(int(status[i]), settings.until_train_loss)
        values = {k: float(v[i]) for k, v in measures.items()}
        if name == "diverged":
            values = {k: math.nan for k in values}
        # Early stopping's record, kept for diverged members too (it predates divergence).
        acc = windows["test_accuracy"][i]
        best = int(np.nanargmax(acc)) if np.any(np.isfinite(acc)) else None
        values["best_test_accuracy"] = math.nan if best is None else float(acc[best])
        values["best_test_step"] = math.nan if best is None else float(ends[best])
        curves = {k: [(ends[r], float(v[i, r])) for r in range(v.shape[1])
                      if not math.isnan(v[i, r])] for k, v in windows.items()}
        curves.update({k: [(at[j], float(v[i, j])) for j in range(v.shape[1])
                           if not math.isnan(v[i, j])] for k, v in records.items()})
        rows.append({
            "index": mb.index,
            "point": dict(mb.point),
            "status": name, "steps": int(taken[i]), "measures": values, "curves": curves,
        })
    return rows


def _group_inputs(cfg: dict, members, mesh) -> tuple[dict, jax.Array, jax.Array | None]:
    """The vmapped values, padded to a multiple of the devices and sharded: optimizer
    hyper-parameters, seeds, and a swept L2 coefficient (None: the fixed one)."""
    hyper_paths = sorted({"optimizer.learning_rate"} | {
        p for p in cfglib.vmapped_paths(cfg) if p.startswith("optimizer.")})
    padded = members + [members[-1]] * (padded_size(len(members), mesh) - len(members))
    hyper = {p.split(".", 1)[1]: jnp.asarray([mb.get(p) for mb in padded], jnp.float32)
             for p in hyper_paths}
    seeds = jnp.asarray([mb.get("train.seed") for mb in padded], jnp.int32)
    l2 = (jnp.asarray([mb.get("train.l2") for mb in padded], jnp.float32)
          if "train.l2" in cfglib.vmapped_paths(cfg) else None)
    return shard_members(hyper, mesh), shard_members(seeds, mesh), shard_members(l2, mesh)


def _measure(first, model, train, test, cache: dict, out: GroupOutput) -> dict:
    """The end-of-training measures of every member (the program cached per study)."""
    train_cfg = first.config["train"]
    key = json.dumps([first.config["model"], first.config["measure"],
                      first.config["data"], train_cfg["loss"]], sort_keys=True)
    if key not in cache:
        loss_fn = loss_function(model.apply_fn, train_cfg["loss"])
        cache[key] = make_measure_program(
            model.apply_fn, loss_fn, _table(MeasureSettings, first.config["measure"]),
            train, test)
    values = cache[key](out.params, jax.random.key(train_cfg["seed"]))
    interrupt.wait(values)
    return jax.device_get(values)


def run_group(cfg: dict, key: str, members: list[cfglib.Member], model: build.Model,
              train, test, progress=False, cache: dict | None = None) -> GroupResult:
    """Train and measure one group; returns a `GroupResult` (rows, seconds, compile,
    train and measure seconds).

    `progress`: "bar" (or True) for a tqdm bar, "lines" for a line per record window
    (when stderr is not a terminal), False for none. Ctrl-C stops the group after the
    record window it arrives in and raises `interrupt.Interrupted`; the group is then not
    returned (earlier groups were stored by the caller). `cache` keeps compiled measure
    programs between groups: every group of a study measures the same parameter shapes
    on the same data, so it compiles once.
    """
    cache = {} if cache is None else cache
    first = members[0]
    opt_cfg = dict(first.config["optimizer"])
    for p in cfglib.vmapped_paths(cfg) + ["optimizer.learning_rate"]:
        if p.startswith("optimizer."):
            opt_cfg.pop(p.split(".", 1)[1], None)
    settings = group_settings(first.config["train"], first.config.get("record"),
                              train[0].shape[0])
    layers = (tx.find_dense_layers(model.apply_fn, model.init(jax.random.key(0)),
                                   train[0][:1]) if opt_cfg["name"] == "kfac" else ())
    make_optimizer = functools.partial(build_optimizer, opt_cfg, total_steps=settings.steps,
                                       layers=layers)
    mesh = member_mesh()
    hyper, seeds, l2 = _group_inputs(cfg, members, mesh)
    report = WindowProgress(settings.steps, settings.record_every,
                            f"batch {settings.batch_size}", _progress_mode(progress))
    program = make_group_program(model, make_optimizer, settings, *train, test=test,
                                 on_window=report, optimizer=opt_cfg)
    with interrupt.catching():
        t0 = time.perf_counter()
        compiled = program.lower(hyper, seeds, l2).compile()
        t1 = time.perf_counter()
        interrupt.check()
        out = compiled(hyper, seeds, l2)
        interrupt.wait(out)
        report.close()
        t2 = time.perf_counter()
        interrupt.check()   # stopped early: the group is unfinished, keep nothing
        measures = _measure(first, model, train, test, cache, out)
        t3 = time.perf_counter()
    rows = _member_rows(cfg, members, settings, out, measures)
    return GroupResult(rows, t3 - t0, t1 - t0, t2 - t1, t3 - t2)


def model_for(table: dict, spec, splits: datalib.Splits) -> build.Model:
    """The group's model: the Python object given to `experiments.run`, or the
    `[model]` table's, checked against the data's inputs and targets."""
    x, y = splits.train
    if spec is None and table["name"] == "python" and not table.get("factory"):
        raise cfglib.ConfigError("model.name = 'python' needs model.factory (or "
                                 "experiments.run(..., model=...))")
    num_outputs = splits.num_classes or int(y[:1].size)
    model = (build.builtin(table, x[:1], num_outputs) if spec is None
             else build.as_model(spec, x[:1]))
    build.check_outputs(model, x[:2], y, splits.num_classes)
    return model


def preflight(cfg: dict, model=None, arrays=None) -> dict:
    """Load each distinct dataset of the grid and build each distinct model on it, so a
    bad factory, bad data or a model that does not fit the targets fails before any
    run directory exists; returns the loaded datasets by `[data]` table."""
    datasets, checked = {}, set()
    for members in cfglib.groups(cfg).values():
        first = members[0].config
        data_key = json.dumps(first["data"], sort_keys=True)
        if data_key not in datasets:
            datasets[data_key] = datalib.load(first["data"], arrays)
        key = json.dumps([first["model"], data_key], sort_keys=True)
        if key not in checked:
            checked.add(key)
            model_for(first["model"], model, datasets[data_key])
    return datasets


def run_sweep(cfg: dict, path: Path, *, model=None, arrays=None, progress: bool = False,
              log=None, datasets: dict | None = None, mixed: bool = False) -> Results:
    """Train and measure a resolved sweep config's grid into run directory `path`,
    skipping the groups its store already holds (`mixed`: the directory was extended
    with `--add`, so groups are matched on their members' configs only)."""
    log = log or (lambda msg: None)
    groups = cfglib.groups(cfg)
    mine = list(groups.items())[jax.process_index()::jax.process_count()]
    with Store(path / rundir.STORE) as store:
        todo = rundir.pending(mine, store, mixed)
        log(f"{len(groups)} groups, {sum(len(v) for v in groups.values())} members; "
            f"{len(mine) - len(todo)} already finished; {jax.local_device_count()} "
            f"local device(s)")
        bar = None
        if _progress_mode(progress) == "bar":
            bar = tqdm(total=len(todo), desc="groups", unit="group", file=sys.stderr)
        cache: dict = {}
        datasets = {} if datasets is None else datasets
        for key, members, group_hash in todo:
            # Data keys may be swept (label noise, training-set size): load per group.
            first = members[0].config
            data_key = json.dumps(first["data"], sort_keys=True)
            if data_key not in datasets:
                datasets[data_key] = datalib.load(first["data"], arrays)
            splits = datasets[data_key]
            net = model_for(first["model"], model, splits)
            result = run_group(cfg, key, members, net, *splits[:2], progress, cache)
            rows, seconds, compile_seconds = result[:3]
            store.write_group(key, rows, seconds, compile_seconds, group_hash,
                              result.train_seconds, result.measure_seconds)
            counts = {s: sum(r["status"] == s for r in rows) for s in
                      ("converged", "finished", "unconverged", "diverged")}
            log(f"group {key}: {len(rows)} members in {seconds:.1f}s "
                f"(compile {compile_seconds:.1f}s); " +
                ", ".join(f"{n} {s}" for s, n in counts.items() if n))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    return Results(path)
