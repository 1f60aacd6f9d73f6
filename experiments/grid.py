"""The grid of a sweep config: its axes (plain and zipped), members and groups.

Each key of `[sweep]` is one axis; each `[[sweep.zip]]` table is one axis whose lists
advance together. Members that differ only in vmapped values (the learning rate, the
seed, the L2 coefficient, a Basin optimizer's float hyper-parameters) form a group: one
compiled program with the members on a vmapped axis.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import transforms as tx
from experiments.schema import ConfigError, check

SHORTHANDS = {"batch_size": "train.batch_size", "learning_rate": "optimizer.learning_rate",
              "seed": "train.seed"}

# Values that may differ inside one compiled group (they are vmapped): the learning
# rate, the seed, the L2 coefficient, and a Basin optimizer's hyper-parameters swept
# over floats. Everything else that varies (shapes, names, integers such as refresh
# intervals, booleans) starts a new group.
ALWAYS_VMAPPED = ("optimizer.learning_rate", "train.seed", "train.l2")

# A grid above this many members is refused unless the caller allows it.
MAX_MEMBERS = 10_000

@dataclass(frozen=True)
class Member:
    """One point of the grid: the fully resolved config of one training run."""

    index: int
    config: dict
    point: dict = dataclasses.field(default_factory=dict)  # sweep key -> value

    def get(self, path: str) -> Any:
        return get_path(self.config, path)


def get_path(cfg: dict, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"unknown config key '{path}'")
        node = node[part]
    return node


def set_path(cfg: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if part not in node and parts[0] in ("optimizer", "model") and i > 0:
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key '{path}'" if part not in node else
                              f"'{'.'.join(parts[:i + 1])}' is a value, not a table")
        node = node[part]
    node[parts[-1]] = value


def axes(cfg: dict) -> list[tuple[list[str], list[tuple]]]:
    """The grid's axes: (sweep keys, their value tuples); a zip table is one axis."""
    out = []
    for key, values in cfg["sweep"].items():
        if key == "zip":
            for table in values:
                out.append((list(table), list(zip(*table.values()))))
        else:
            out.append(([key], [(v,) for v in values]))
    return out


def sweep_keys(cfg: dict) -> list[str]:
    """Every swept key as written in `[sweep]` (zipped keys included), in order."""
    return [k for keys, _ in axes(cfg) for k in keys]


def check_sweep(cfg: dict, allow_large: bool) -> None:
    sweep = cfg["sweep"]
    for key, values in sweep.items():
        if key == "zip":
            check(isinstance(values, list) and values and all(
                isinstance(t, dict) and t for t in values),
                "sweep.zip must be a list of tables ([[sweep.zip]])")
            for table in values:
                lengths = {k: len(v) if isinstance(v, list) else -1 for k, v in table.items()}
                check(all(n > 0 for n in lengths.values()),
                      f"each key of a [[sweep.zip]] table needs a non-empty list; got "
                      f"{table!r}")
                check(len(set(lengths.values())) == 1,
                      "the lists of a [[sweep.zip]] table must have equal lengths; got " +
                      ", ".join(f"{k}: {n}" for k, n in lengths.items()))
            continue
        check(isinstance(values, list) and len(values) > 0,
              f"sweep.{key} must be a non-empty list, got {values!r}")
    keys = sweep_keys(cfg)
    check(len(set(map(_path, keys))) == len(keys), "a key is swept twice in [sweep]")
    for key in keys:
        path = _path(key)
        check(path.split(".")[0] in ("data", "model", "optimizer", "train", "measure",
                                     "record"), f"sweep.{key}: unknown config key '{path}'")
    size = grid_size(cfg)
    check(allow_large or size <= MAX_MEMBERS,
          f"the grid has {size:,} members, above the limit of {MAX_MEMBERS:,}; pass --yes "
          "(allow_large=True) to run it")


def _path(key: str) -> str:
    return SHORTHANDS.get(key, key)


def grid_size(cfg: dict) -> int:
    """The number of members, counted without expanding the grid (1 without a sweep)."""
    return math.prod(len(v) for _, v in axes(cfg)) if "sweep" in cfg else 1


def expand(cfg: dict) -> list[Member]:
    """The grid: one `Member` per combination of the sweep's axes, in order."""
    base = {k: v for k, v in cfg.items() if k != "sweep"}
    grid = axes(cfg)
    members = []
    for i, combo in enumerate(itertools.product(*(values for _, values in grid))):
        resolved = copy.deepcopy(base)
        point = {}
        for (keys, _), values in zip(grid, combo):
            for key, value in zip(keys, values):
                point[key] = value
        if "model.name" in point and point["model.name"] != base["model"]["name"]:
            resolved["model"] = {"name": point["model.name"]}  # the variant's defaults
        for key, value in point.items():
            set_path(resolved, _path(key), value)
        members.append(Member(i, resolved, point))
    return members


def swept_paths(cfg: dict) -> list[str]:
    return [_path(k) for k in sweep_keys(cfg)]


def vmapped_paths(cfg: dict) -> list[str]:
    """Swept paths that vary inside a group (see ALWAYS_VMAPPED): an optimizer's float
    hyper-parameters only if every optimizer of the study is one of Basin's (whose
    builders all accept traced hyper-parameters; optax's may branch on values)."""
    names = [m.get("optimizer.name") for m in expand(cfg)] if cfg["sweep"] else [
        cfg["optimizer"]["name"]]
    basin = all(name in tx.names() for name in names)
    out = []
    for keys, values in axes(cfg):
        for j, key in enumerate(keys):
            path = _path(key)
            floats = all(isinstance(v[j], float) for v in values)
            if path in ALWAYS_VMAPPED or (basin and floats and path.startswith(
                    "optimizer.") and path != "optimizer.name"):
                out.append(path)
    return out


def group_key(member: Member, cfg: dict, vmapped: set | None = None) -> str:
    """Members with equal keys share shapes and a program: one compilation, vmapped."""
    vmapped = set(vmapped_paths(cfg)) if vmapped is None else vmapped
    fixed = {p: member.get(p) for p in swept_paths(cfg) if p not in vmapped}
    return json.dumps(fixed, sort_keys=True)


def groups(cfg: dict) -> dict[str, list[Member]]:
    vmapped = set(vmapped_paths(cfg))
    out: dict[str, list[Member]] = {}
    for m in expand(cfg):
        out.setdefault(group_key(m, cfg, vmapped), []).append(m)
    return out
