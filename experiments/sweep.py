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
from datetime import datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from experiments import config as cfglib
from experiments.data import mnist1d, randomize_labels, teacher_student
from experiments.measure import make_measure_program
from experiments.store import Store
from experiments.train import (
    CONVERGED,
    DIVERGED,
    build_model,
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
        from experiments.studies import load_json

        return load_json(self.path / "results.json", {})

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


def _load_data(d: dict):
    """The `[data]` table's train and test sets as device arrays (labels of the training
    set randomized when `label_noise` > 0; the test labels never are)."""
    if d["name"] == "teacher_student":
        data = teacher_student(d["num_train"], d["num_test"], seed=d["seed"])
    else:
        data = mnist1d()
    if not 0 < d["num_train"] <= len(data.y_train) or not 0 < d["num_test"] <= len(data.y_test):
        raise cfglib.ConfigError(
            f"data.num_train must be in 1..{len(data.y_train)} and data.num_test in "
            f"1..{len(data.y_test)}; got {d['num_train']} and {d['num_test']}")
    y_train = data.y_train[: d["num_train"]]
    if d.get("label_noise", 0.0) > 0:
        y_train = randomize_labels(y_train, float(d["label_noise"]), data.num_classes,
                                   seed=d["seed"]).labels
    train = (jnp.asarray(data.x_train[: d["num_train"]]), jnp.asarray(y_train))
    test = (jnp.asarray(data.x_test[: d["num_test"]]), jnp.asarray(data.y_test[: d["num_test"]]))
    return train, test, data.num_classes


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, file=sys.stderr)


def run_group(cfg: dict, key: str, members: list[cfglib.Member], train, test,
              num_classes: int, progress: bool = False,
              cache: dict | None = None) -> tuple[list[dict], float, float]:
    """Train and measure one group; returns (member rows, seconds, compile seconds).

    `cache` keeps compiled measure programs between groups: every group of a study
    measures the same parameter shapes on the same data, so it compiles once.
    """
    cache = {} if cache is None else cache
    first = members[0]
    model = build_model(first.config["model"], train[0].shape[1], num_classes)
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
            "point": {k: mb.get(cfglib.SHORTHANDS.get(k, k)) for k in cfg["sweep"]},
            "status": name, "steps": int(taken[i]), "measures": values, "curves": curves,
        })
    return rows, seconds, compile_seconds


def run(config: dict | str | None = None, *, overrides: list[str] = (),
        out: str | Path | None = None, resume: str | Path | None = None,
        progress: bool = False, log=None) -> Results:
    """Run a study and return its `Results`; the Python API under `basin run`.

    Args:
      config: a resolved config dict, a config path or shipped name (None: the default).
      overrides: `key=value` strings applied on top (as `basin run --set`).
      out: the run directory (default `runs/<name>-<timestamp>`).
      resume: an existing run directory: finished groups are skipped.

    Example:
      >>> res = experiments.run("sharpness_vs_generalization", overrides=["train.steps=200"])
      >>> res.records()[0]["lambda_max"]
    """
    log = log or (lambda msg: None)
    if resume is not None:
        path = Path(resume)
        if not (path / "config.json").is_file():
            raise cfglib.ConfigError(f"cannot resume: {path} holds no config.json")
        cfg = json.loads((path / "config.json").read_text())
    else:
        cfg = config if isinstance(config, dict) else cfglib.load(config, list(overrides))
        if isinstance(config, dict):
            cfglib.validate(cfg)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path(out) if out is not None else Path("runs") / f"{cfg['name']}-{stamp}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    from experiments import studies

    if studies.is_custom(cfg):
        studies.get(cfg["study"]).run(cfg, path, log)
        return Results(path)
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
            from tqdm import tqdm
            bar = tqdm(total=len(todo), desc="groups", unit="group", file=sys.stderr)
        cache: dict = {}
        datasets: dict = {}
        for key, members in todo:
            # Data keys may be swept (label noise, training-set size): load per group.
            data_key = json.dumps(members[0].config["data"], sort_keys=True)
            if data_key not in datasets:
                datasets[data_key] = _load_data(members[0].config["data"])
            train, test, num_classes = datasets[data_key]
            rows, seconds, compile_seconds = run_group(cfg, key, members, train, test,
                                                       num_classes, progress, cache)
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
