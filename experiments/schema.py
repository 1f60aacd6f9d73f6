"""Typed config tables: frozen dataclasses, one generic validator, a generated reference.

A table is a frozen dataclass whose fields carry their type, default and limits
(`option(default, ge=..., doc=...)`). `build(cls, raw, where)` turns a TOML table into
an instance, checking every value against its field and naming the key on error, and
`reference(cls)` writes the table's documentation from the same fields, so defaults,
limits and docs live in one place.

Supported field types: `int`, `float`, `bool`, `str`, `Literal[...]`, `tuple[T, ...]`,
`T | None`, `dict` (an open table, checked elsewhere), another table, and a tagged union
of tables (`A | B`, chosen by the value of their common `name` field).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Literal, Union

# A bound on every integer a config may hold: int64-safe and far above any real budget.
MAX_INT = 2**53


class ConfigError(ValueError):
    """A user error in a config or an override; its message is one line."""


def option(default: Any = dataclasses.MISSING, *, doc: str = "", ge=None, gt=None,
           le=None, factory=None) -> Any:
    """A table field: its default (none: required), limits and one line of docs."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def fail(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def check(cond: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `cond` (for a table's cross-field checks)."""
    if not cond:
        fail(message)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _variants(tp) -> list[type]:
    return [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]


def _limits(meta) -> str:
    parts = [f"{op} {meta[key]}" for key, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
             if meta.get(key) is not None]
    return " and ".join(parts)


def describe(tp, meta=None) -> str:
    """A field type in words ("an integer >= 1", "one of 'a', 'b'")."""
    meta = meta or {}
    lim = _limits(meta)
    lim = f" {lim}" if lim else ""
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an integer{lim}"
    if tp is float:
        return f"a number{lim}"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        if typing.get_origin(inner) is Literal:
            return "a list drawn from " + ", ".join(repr(a) for a in typing.get_args(inner))
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        return f"a list of {plural.get(inner, 'values')}{lim}"
    if _is_union(tp) and _variants(tp):
        return "a table"
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return describe(args[0], meta) + " (or empty)"
    return "a table"


def _in_limits(v, meta) -> bool:
    return ((meta.get("ge") is None or v >= meta["ge"])
            and (meta.get("gt") is None or v > meta["gt"])
            and (meta.get("le") is None or v <= meta["le"]))


def convert(tp, value: Any, path: str, meta=None) -> Any:
    """`value` checked against field type `tp` (and limits in `meta`), or ConfigError."""
    meta = meta or {}

    def bad():
        fail(f"{path} must be {describe(tp, meta)}, got {value!r}")

    if tp is bool:
        return value if isinstance(value, bool) else bad()
    if tp is int:
        ok = (isinstance(value, int) and not isinstance(value, bool)
              and abs(value) <= MAX_INT and _in_limits(value, meta))
        return value if ok else bad()
    if tp is float:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value) and _in_limits(value, meta))
        return float(value) if ok else bad()
    if tp is str:
        return value if isinstance(value, str) else bad()
    if typing.get_origin(tp) is Literal:
        return value if isinstance(value, str) and value in typing.get_args(tp) else bad()
    if typing.get_origin(tp) is tuple:
        inner = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            bad()
        return tuple(convert(inner, v, path, meta) if _fits(inner, v, meta) else bad()
                     for v in value)
    if tp is dict or typing.get_origin(tp) is dict:
        return dict(value) if isinstance(value, dict) else fail(
            f"{path} must be a table, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if _is_union(tp) and _variants(tp):
        return _build_tagged(_variants(tp), value, path)
    if _is_union(tp):
        return None if value is None else convert(
            next(a for a in typing.get_args(tp) if a is not type(None)), value, path, meta)
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def _fits(tp, v, meta) -> bool:
    try:
        convert(tp, v, "", meta)
        return True
    except ConfigError:
        return False


def _tags(cls) -> tuple[str, ...]:
    return typing.get_args(typing.get_type_hints(cls)["name"])


def _build_tagged(variants: list[type], value: Any, path: str):
    if not isinstance(value, dict):
        fail(f"{path} must be a table, got {value!r}")
    tags = {t: cls for cls in variants for t in _tags(cls)}
    default = dataclasses.fields(variants[0])[0].default
    name = value.get("name", default)
    if name not in tags:
        fail(f"{path}.name must be one of {', '.join(repr(t) for t in tags)}, got {name!r}")
    return build(tags[name], value, path)


def build(cls, raw: Any, where: str = ""):
    """An instance of table `cls` from the mapping `raw` (missing keys take defaults)."""
    if not isinstance(raw, dict):
        fail(f"{where or 'the config'} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in names]
    if unknown and not getattr(cls, "OPEN", False):
        fail(f"unknown config key '{_join(where, unknown[0])}'")
    values = {}
    for f in dataclasses.fields(cls):
        path = _join(where, f.name)
        if f.name in raw:
            values[f.name] = convert(hints[f.name], raw[f.name], path, f.metadata)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            fail(f"{path} is required")
        elif dataclasses.is_dataclass(hints[f.name]) or _variants(hints[f.name]):
            values[f.name] = convert(hints[f.name], {}, path, f.metadata)
    out = cls(**values)
    if unknown:
        object.__setattr__(out, "extra", {k: raw[k] for k in unknown})
    if hasattr(out, "check"):
        out.check(where)
    return out


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def as_dict(table) -> dict:
    """A table as plain JSON-ready data (tuples as lists; an open table's extra keys)."""
    out = {}
    for f in dataclasses.fields(table):
        v = getattr(table, f.name)
        out[f.name] = as_dict(v) if dataclasses.is_dataclass(v) else _plain(v)
    out.update(_plain(getattr(table, "extra", {})))
    return out


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(a) for a in v]
    if isinstance(v, dict):
        return {k: _plain(a) for k, a in v.items()}
    return v


def defaults(cls) -> dict:
    """The default values of table `cls` as plain data."""
    return as_dict(build(cls, {}, ""))


def reference(cls, where: str = "") -> list[str]:
    """Markdown lines documenting every key of `cls`: type, default, limits, meaning."""
    hints = typing.get_type_hints(cls)
    lines = []
    plain = [f for f in dataclasses.fields(cls)
             if not (dataclasses.is_dataclass(hints[f.name]) or _variants(hints[f.name]))]
    if plain:
        lines += [f"### `[{where}]`" if where else "### top level", "",
                  " ".join((cls.__doc__ or "").split()), "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in plain:
            default = ("required" if f.default is dataclasses.MISSING and
                       f.default_factory is dataclasses.MISSING else
                       json.dumps(_plain(f.default if f.default is not dataclasses.MISSING
                                         else f.default_factory())))
            lines.append(f"| `{f.name}` | {describe(hints[f.name], f.metadata)} | "
                         f"`{default}` | {f.metadata.get('doc', '')} |")
        lines.append("")
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += reference(tp, _join(where, f.name))
        for variant in _variants(tp):
            tags = " / ".join(f'"{t}"' for t in _tags(variant))
            sub = reference(variant, _join(where, f.name))
            if sub:
                sub[0] += f" with name = {tags}"
            lines += sub
    return lines
