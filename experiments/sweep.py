"""Run a study: expand the grid, train each group as one program, measure, store.

Groups (members that share shapes) run one after another; inside a group the members
are one `vmap`, and the member axis is sharded over every local device
(`jax.sharding.Mesh` + `NamedSharding`), so the same code runs on one CPU, on simulated
CPU devices and on GPUs. Under `jax.distributed` each process sees its own local
devices and runs its share of the groups (process i takes every P-th group) into the
same run directory's store, which SQLite serializes.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from experiments import build
from experiments import config as cfglib
from experiments import data as datalib
from experiments.measure import make_measure_program
from experiments.store import Store
from experiments.train import (
    CONVERGED,
    DIVERGED,
    loss_function,
    make_group_program,
    record_steps,
    total_steps,
)


@dataclass
class Results:
    """A run directory: its resolved config and its results store."""

    path: Path

    @property
    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def records(self) -> list[dict]:
        """One dict per member: the swept values, status, steps and every measure."""
        with Store(self.path / "results.sqlite") as store:
            return store.records()

    def curves(self, name: str = "train_loss") -> dict[int, list[tuple[int, float]]]:
        with Store(self.path / "results.sqlite") as store:
            return store.curves(name)

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


def _shard(tree: Any, mesh: Mesh | None) -> Any:
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec("members")))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)


def run_group(cfg: dict, key: str, members: list[cfglib.Member], model: build.Model,
              train, test, progress: bool = False,
              cache: dict | None = None) -> tuple[list[dict], float, float]:
    """Train and measure one group; returns (member rows, seconds, compile seconds).

    `cache` keeps compiled measure programs between groups: every group of a study
    measures the same parameter shapes on the same data, so it compiles once.
    """
    cache = {} if cache is None else cache
    first = members[0]
    opt_cfg = dict(first.config["optimizer"])
    hyper_paths = sorted({"optimizer.learning_rate"} | {
        p for p in cfglib.vmapped_paths(cfg) if p.startswith("optimizer.")})
    for p in hyper_paths:
        opt_cfg.pop(p.split(".", 1)[1], None)
    train_cfg = first.config["train"]
    batch_size = train_cfg["batch_size"]

    devices = jax.local_devices()
    m = len(members)
    padded = members + [members[-1]] * (-m % len(devices))
    hyper = {p.split(".", 1)[1]: jnp.asarray([mb.get(p) for mb in padded], jnp.float32)
             for p in hyper_paths}
    seeds = jnp.asarray([mb.get("train.seed") for mb in padded], jnp.int32)
    mesh = Mesh(np.array(devices), ("members",)) if len(devices) > 1 else None
    hyper, seeds = _shard(hyper, mesh), _shard(seeds, mesh)

    steps = total_steps(train_cfg, train[0].shape[0], batch_size)
    bar = _progress(steps, f"batch {batch_size}", progress)
    callback = None if bar is None else (lambda r: bar.update(
        min(train_cfg["record_every"], steps - bar.n)))
    record_cfg = first.config.get("record")
    program = make_group_program(model, opt_cfg, train_cfg, batch_size, *train,
                                 on_window=callback, test=test, record_cfg=record_cfg)
    # A swept L2 coefficient is vmapped like the learning rate; a fixed one is a constant.
    l2 = (_shard(jnp.asarray([mb.get("train.l2") for mb in padded], jnp.float32), mesh)
          if "train.l2" in cfglib.vmapped_paths(cfg) else None)
    t0 = time.perf_counter()
    compiled = program.lower(hyper, seeds, l2).compile()
    compile_seconds = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(hyper, seeds, l2))
    if bar is not None:
        bar.close()
    measure_key = json.dumps([first.config["model"], first.config["measure"],
                              first.config["data"], train_cfg["loss"]], sort_keys=True)
    if measure_key not in cache:
        loss_fn = loss_function(model.apply_fn, train_cfg["loss"])
        cache[measure_key] = make_measure_program(model.apply_fn, loss_fn,
                                                  first.config["measure"], train, test)
    measure = cache[measure_key]
    measures = jax.device_get(measure(out.params, jax.random.key(train_cfg["seed"])))
    seconds = time.perf_counter() - t0

    status, taken, curve = (np.asarray(a) for a in jax.device_get(
        (out.status, out.steps, out.curve)))
    windows = {"train_loss": curve, "test_loss": np.asarray(out.test_loss),
               "test_accuracy": np.asarray(out.test_accuracy)}
    records = {k: np.asarray(v) for k, v in jax.device_get(out.records).items()}
    at = record_steps(train_cfg, record_cfg, train[0].shape[0], batch_size)
    every = train_cfg["record_every"]
    ends = [min((r + 1) * every, steps) for r in range(curve.shape[1])]
    target = float(train_cfg["until_train_loss"])
    rows = []
    for i, mb in enumerate(members):
        name = _status_name(int(status[i]), target)
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
    return rows, seconds, compile_seconds


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
              log=None, datasets: dict | None = None) -> Results:
    """Train and measure a resolved sweep config's grid into run directory `path`,
    skipping the groups its store already holds."""
    log = log or (lambda msg: None)
    groups = cfglib.groups(cfg)
    mine = list(groups.items())[jax.process_index()::jax.process_count()]
    with Store(path / "results.sqlite") as store:
        done = store.finished_groups()
        todo = [(k, v) for k, v in mine if k not in done]
        log(f"{len(groups)} groups, {sum(len(v) for v in groups.values())} members; "
            f"{len(groups) - len(todo)} already finished; {jax.local_device_count()} "
            f"local device(s)")
        bar = None
        if progress:
            bar = tqdm(total=len(todo), desc="groups", unit="group", file=sys.stderr)
        cache: dict = {}
        datasets = {} if datasets is None else datasets
        for key, members in todo:
            # Data keys may be swept (label noise, training-set size): load per group.
            first = members[0].config
            data_key = json.dumps(first["data"], sort_keys=True)
            if data_key not in datasets:
                datasets[data_key] = datalib.load(first["data"], arrays)
            splits = datasets[data_key]
            net = model_for(first["model"], model, splits)
            rows, seconds, compile_seconds = run_group(cfg, key, members, net,
                                                       *splits[:2], progress, cache)
            store.write_group(key, rows, seconds, compile_seconds)
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
