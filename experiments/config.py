"""Study configs: TOML files (data, never code), overrides, validation and the grid.

A config has the tables `[data]`, `[model]`, `[optimizer]`, `[train]`, `[measure]`,
`[record]` (curvature along training) and `[sweep]`. Each key of `[sweep]` is a dotted path into the config (shorthands:
`batch_size` → `train.batch_size`, `learning_rate` → `optimizer.learning_rate`,
`seed` → `train.seed`) with a list of values; the grid is their product.
"""

from __future__ import annotations

import copy
import itertools
import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "sharpness_vs_generalization"

SHORTHANDS = {"batch_size": "train.batch_size", "learning_rate": "optimizer.learning_rate",
              "seed": "train.seed"}

# Values that may differ inside one compiled group (they are vmapped): the learning
# rate, the seed, and any optimizer hyper-parameter swept over floats. Everything else
# that varies (shapes, names, integers such as refresh intervals) starts a new group.
ALWAYS_VMAPPED = ("optimizer.learning_rate", "train.seed", "train.l2")

DEFAULTS: dict[str, Any] = {
    "name": "study",
    "description": "",
    "study": "sweep",
    "data": {"name": "mnist1d", "num_train": 4000, "num_test": 1000, "seed": 0,
             "label_noise": 0.0},
    "model": {"name": "mlp", "hidden": [100, 100], "activation": "relu",
              "channels": [16, 32, 32], "kernel_size": 5, "width": 16, "depth": 4,
              "skip": True, "embed_dim": 128, "num_blocks": 2, "num_heads": 4,
              "patch_size": 4},
    "optimizer": {"name": "sgd", "learning_rate": 0.1},
    "train": {"batch_size": 128, "seed": 0, "steps": 1000, "epochs": 0,
              "until_train_loss": 0.0, "record_every": 100, "loss": "cross_entropy",
              "diverge_above": 100.0, "l2": 0.0},
    "measure": {"num_examples": 1000, "chunk_size": 1000, "measures": ["lambda_max"],
                "rho": 0.05, "adaptive_rho": 0.5, "ascent_steps": 10, "random_trials": 8,
                "keskar_epsilon": 1e-3, "pac_bayes_threshold": 0.1, "lanczos_steps": 20,
                "trace_probes": 30},
    # Curvature along training (see docs/notes/runner_recording.md); every = 0: off.
    "record": {"every": 0, "measures": ["lambda_max"], "num_examples": 1000,
               "chunk_size": 1000, "lanczos_steps": 20, "probes": 10, "index_steps": 80},
    "sweep": {},
}

RECORD_MEASURES = ("lambda_max", "lambda_min", "index", "grad_norms", "noise_scale")

MEASURES = ("lambda_max", "trace", "worst_case", "adaptive", "random", "keskar",
            "pac_bayes", "noise_scale")


class ConfigError(ValueError):
    """A user error in a config or an override; its message is one line."""


@dataclass(frozen=True)
class Member:
    """One point of the grid: the fully resolved config of one training run."""

    index: int
    config: dict

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
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"unknown config key '{path}'")
        node = node[part]
    if parts[-1] not in node and parts[0] not in ("optimizer", "sweep"):
        raise ConfigError(f"unknown config key '{path}'")
    node[parts[-1]] = value


def config_path(name_or_path: str | None) -> Path:
    """A config file: a path, or the name of one shipped in `configs/`."""
    name = name_or_path or DEFAULT_CONFIG
    path = Path(name)
    if path.suffix == ".toml" and path.exists():
        return path
    shipped = resources.files("configs") / f"{path.stem}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    raise ConfigError(f"no config '{name}': give a .toml path or one of "
                      f"{', '.join(list_configs())}")


def list_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("configs").iterdir()
                  if p.name.endswith(".toml"))


def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in out and where.split(".")[0] not in ("optimizer", "sweep"):
            raise ConfigError(f"unknown config key '{path}'")
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{path}.")
        else:
            out[key] = value
    return out


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


def load(name_or_path: str | None = None, overrides: list[str] = ()) -> dict:
    """Read a config (path or shipped name), apply `key=value` overrides, validate."""
    path = config_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    cfg = _merge(defaults(raw.get("study", "sweep")), raw)
    for text in overrides:
        key, value = parse_override(text)
        if key.startswith("sweep.") and "sweep" not in cfg:
            raise ConfigError(f"'{key}': study '{cfg['study']}' has no [sweep] table")
        if key.startswith("sweep."):  # sweep keys are dotted paths themselves
            cfg["sweep"][key[len("sweep."):]] = value
        else:
            set_path(cfg, SHORTHANDS.get(key, key), value)
    validate(cfg)
    return cfg


def defaults(study: str) -> dict:
    """The defaults a config of `study` is merged over: the sweep tables, or a custom
    study's own tables (see `experiments.studies`)."""
    from experiments import studies

    module = studies.get(study)
    if module is None or module.SWEEP:
        return DEFAULTS
    return {"name": module.NAME, "description": "", "study": study, **module.DEFAULTS}


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(cfg: dict) -> None:
    """Check types and ranges of a resolved config (grid values included)."""
    from experiments import studies

    module = studies.get(cfg.get("study", "sweep"))
    if module is not None and not module.SWEEP:
        module.validate(cfg)
        return
    _check(cfg["data"]["name"] in ("mnist1d", "teacher_student"),
           f"data.name must be 'mnist1d' or 'teacher_student', got {cfg['data']['name']!r}")
    model = cfg["model"]
    _check(model["name"] in ("mlp", "cnn", "cnn_bn", "resnet", "transformer"),
           f"model.name must be 'mlp', 'cnn', 'cnn_bn', 'resnet' or 'transformer', got "
           f"{model['name']!r}")
    for key in ("hidden", "channels"):
        v = model[key]
        _check(isinstance(v, list) and all(isinstance(h, int) and h > 0 for h in v),
               f"model.{key} must be a list of positive integers, got {v!r}")
    for key in ("kernel_size", "width", "depth", "embed_dim", "num_blocks", "num_heads",
                "patch_size"):
        _check(isinstance(model[key], int) and model[key] > 0,
               f"model.{key} must be a positive integer, got {model[key]!r}")
    _check(model["embed_dim"] % model["num_heads"] == 0,
           f"model.num_heads must divide model.embed_dim ({model['embed_dim']}), got "
           f"{model['num_heads']!r}")
    _check(isinstance(model["skip"], bool), f"model.skip must be true or false, got "
                                            f"{model['skip']!r}")
    tr = cfg["train"]
    for key in ("steps", "epochs", "record_every"):
        _check(isinstance(tr[key], int) and not isinstance(tr[key], bool) and tr[key] >= 0,
               f"train.{key} must be a non-negative integer, got {tr[key]!r}")
    _check(tr["steps"] > 0 or tr["epochs"] > 0, "set train.steps or train.epochs above 0")
    _check(tr["record_every"] > 0, "train.record_every must be positive")
    _check(_is_number(tr["until_train_loss"]) and tr["until_train_loss"] >= 0,
           f"train.until_train_loss must be a number >= 0, got {tr['until_train_loss']!r}")
    _check(_is_number(tr["diverge_above"]) and tr["diverge_above"] > 0,
           f"train.diverge_above must be a number > 0, got {tr['diverge_above']!r}")
    _check(tr["loss"] in ("cross_entropy", "mse"),
           f"train.loss must be 'cross_entropy' or 'mse', got {tr['loss']!r}")
    _check_recording(cfg)
    ms = cfg["measure"]
    _check(isinstance(ms["measures"], list) and all(m in MEASURES for m in ms["measures"]),
           f"measure.measures must be a list drawn from {', '.join(MEASURES)}; "
           f"got {ms['measures']!r}")
    for key in ("num_examples", "chunk_size", "lanczos_steps", "trace_probes",
                "ascent_steps", "random_trials"):
        _check(isinstance(ms[key], int) and ms[key] > 0,
               f"measure.{key} must be a positive integer, got {ms[key]!r}")
    for key in ("rho", "adaptive_rho", "keskar_epsilon", "pac_bayes_threshold"):
        _check(_is_number(ms[key]) and ms[key] > 0,
               f"measure.{key} must be a number > 0, got {ms[key]!r}")
    sweep = cfg["sweep"]
    _check(isinstance(sweep, dict), "[sweep] must be a table of lists")
    for key, values in sweep.items():
        _check(isinstance(values, list) and len(values) > 0,
               f"sweep.{key} must be a non-empty list, got {values!r}")
        path = SHORTHANDS.get(key, key)
        get_path(cfg, path) if not path.startswith("optimizer.") else None
    num_train = cfg["data"]["num_train"]
    for member in expand(cfg):
        bs = member.get("train.batch_size")
        _check(isinstance(bs, int) and bs > 0, f"train.batch_size must be a positive "
                                               f"integer, got {bs!r}")
        _check(bs <= num_train, f"batch size {bs} is larger than the training set "
                                f"({num_train} examples)")
        lr = member.get("optimizer.learning_rate")
        _check(_is_number(lr) and lr > 0, f"optimizer.learning_rate must be > 0, got {lr!r}")
        _check(isinstance(member.get("train.seed"), int), "train.seed must be an integer")
        l2 = member.get("train.l2")
        _check(_is_number(l2) and l2 >= 0, f"train.l2 must be a number >= 0, got {l2!r}")
        noise = member.get("data.label_noise")
        _check(_is_number(noise) and 0 <= noise <= 1,
               f"data.label_noise must be a number in [0, 1], got {noise!r}")
    _check_optimizers(cfg)


def _check_recording(cfg: dict) -> None:
    rec, every = cfg["record"], cfg["record"]["every"]
    for key in ("every", "num_examples", "chunk_size", "lanczos_steps", "probes",
                "index_steps"):
        v = rec[key]
        _check(isinstance(v, int) and not isinstance(v, bool)
               and v >= (0 if key == "every" else 1),
               f"record.{key} must be a {'non-negative' if key == 'every' else 'positive'} "
               f"integer, got {v!r}")
    _check(every % cfg["train"]["record_every"] == 0,
           f"record.every ({every}) must be a multiple of train.record_every "
           f"({cfg['train']['record_every']})")
    _check(isinstance(rec["measures"], list) and len(rec["measures"]) > 0 and all(
        m in RECORD_MEASURES for m in rec["measures"]),
           f"record.measures must be a non-empty list drawn from "
           f"{', '.join(RECORD_MEASURES)}; got {rec['measures']!r}")
    _check("noise_scale" not in rec["measures"] or rec["num_examples"] > 1,
           "record.num_examples must be at least 2 to record noise_scale")


def _check_optimizers(cfg: dict) -> None:
    """Build each distinct optimizer once so a bad name or value fails before training."""
    import transforms as tx

    seen = set()
    for member in expand(cfg):
        opt = dict(member.config["optimizer"])
        name = opt.pop("name")
        schedule = opt.pop("schedule", "constant")
        _check(schedule in ("constant", "cosine"),
               f"optimizer.schedule must be 'constant' or 'cosine', got {schedule!r}")
        key = json.dumps([name, opt], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        if name == "kfac":
            # Its layers come from the model when training starts; check the other
            # hyper-parameters against the layers of a one-matrix stand-in.
            import jax.numpy as jnp

            opt.setdefault("layers", tx.find_dense_layers(
                lambda w, x: x @ w, jnp.zeros((2, 2)), jnp.zeros((1, 2))))
        try:
            tx.make(name, **opt)
        except ValueError as e:
            raise ConfigError(f"optimizer: {e}") from None

def expand(cfg: dict) -> list[Member]:
    """The grid: one `Member` per combination of the `[sweep]` values, in order."""
    keys = list(cfg["sweep"])
    members = []
    for i, combo in enumerate(itertools.product(*(cfg["sweep"][k] for k in keys))):
        resolved = copy.deepcopy({k: v for k, v in cfg.items() if k != "sweep"})
        for key, value in zip(keys, combo):
            set_path(resolved, SHORTHANDS.get(key, key), value)
        members.append(Member(i, resolved))
    return members


def swept_paths(cfg: dict) -> list[str]:
    return [SHORTHANDS.get(k, k) for k in cfg["sweep"]]


def vmapped_paths(cfg: dict) -> list[str]:
    """Swept paths that vary inside a group (see ALWAYS_VMAPPED); an optimizer's float
    hyper-parameters only if every optimizer of the study accepts traced values."""
    import transforms as tx

    names = cfg["sweep"].get("optimizer.name", [cfg["optimizer"]["name"]])
    traced = all(name in tx.names() and tx.registry.accepts_traced(name) for name in names)
    out = []
    for key, values in cfg["sweep"].items():
        path = SHORTHANDS.get(key, key)
        if path in ALWAYS_VMAPPED or (traced and path.startswith("optimizer.") and
                                      all(isinstance(v, float) for v in values)):
            out.append(path)
    return out


def group_key(member: Member, cfg: dict) -> str:
    """Members with equal keys share shapes and a program: one compilation, vmapped."""
    vmapped = set(vmapped_paths(cfg))
    fixed = {p: member.get(p) for p in swept_paths(cfg) if p not in vmapped}
    return json.dumps(fixed, sort_keys=True)


def groups(cfg: dict) -> dict[str, list[Member]]:
    out: dict[str, list[Member]] = {}
    for m in expand(cfg):
        out.setdefault(group_key(m, cfg), []).append(m)
    return out
