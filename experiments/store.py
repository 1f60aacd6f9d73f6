"""The results store: one SQLite file per run directory (standard library `sqlite3`).

Each finished group is written in one transaction (its members, their measures and
curves, and the group's row), so a run killed at any moment keeps every finished group
and never a half-written one; `--resume` skips the groups already present.

A group's row carries `config_hash`, a hash of the resolved configs of its members
(`experiments.rundir.group_hash`): a group counts as finished only if the same members
with the same settings were stored, never on its key (its batch size) alone.

What is read back is checked, since a store is a file anyone can edit: a damaged
file, a point that is not a flat mapping of swept values, a text where a number
belongs, or JSON nested past `MAX_DEPTH` raise `StoreError`, one line that names the
file, instead of a traceback from deep inside the report.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    key TEXT PRIMARY KEY, seconds REAL, compile_seconds REAL, num_members INTEGER,
    config_hash TEXT, train_seconds REAL, measure_seconds REAL);
CREATE TABLE IF NOT EXISTS members (
    id INTEGER PRIMARY KEY, group_key TEXT NOT NULL REFERENCES groups(key),
    point TEXT NOT NULL, status TEXT NOT NULL, steps INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS measures (
    member_id INTEGER NOT NULL REFERENCES members(id), name TEXT NOT NULL, value REAL,
    PRIMARY KEY (member_id, name));
CREATE TABLE IF NOT EXISTS curves (
    member_id INTEGER NOT NULL REFERENCES members(id), name TEXT NOT NULL,
    step INTEGER NOT NULL, value REAL);
"""

# A point is a flat mapping of swept values; a swept value may be a short list
# (`model.hidden`), so a few levels are legitimate and anything deeper is not a point.
MAX_DEPTH = 8
STATUSES = ("converged", "finished", "unconverged", "diverged")
# Swept values whose type the report relies on (it sorts and formats them).
INTEGER_KEYS = ("batch_size", "seed", "train.batch_size", "train.seed")
NUMBER_KEYS = ("learning_rate", "optimizer.learning_rate")


# Columns of `groups` that stores written by earlier versions lack; added on first write.
LATER_COLUMNS = {"config_hash": "TEXT", "train_seconds": "REAL", "measure_seconds": "REAL"}
TIMES = ("seconds", "compile_seconds", "train_seconds", "measure_seconds")


class StoreError(ValueError):
    """A results store that cannot be read or holds malformed data; one line."""


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def json_depth(text: str) -> int:
    """The deepest nesting of `[`/`{` in JSON `text`, without parsing it (so crafted
    nesting cannot exhaust the recursion `json.loads` uses)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def loads(text: str, where: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads(text)` that raises `StoreError` naming `where` on malformed or
    too deeply nested JSON.

    >>> loads('{"seed": 0}', "results.sqlite")
    {'seed': 0}
    """
    if not isinstance(text, str):
        raise StoreError(f"{where}: expected JSON text, got {type(text).__name__}")
    if json_depth(text) > max_depth:
        raise StoreError(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{where}: not valid JSON ({e})") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_point(point: Any, where: str) -> dict:
    """A stored point must be a mapping of swept keys to JSON values, with integer
    batch sizes and seeds and a numeric learning rate."""
    if not isinstance(point, dict):
        raise StoreError(f"{where}: a member's point must be a mapping, got "
                         f"{type(point).__name__}")
    for key, value in point.items():
        if key in ("member", "status", "steps"):
            raise StoreError(f"{where}: a member's point may not set '{key}'")
        if key in INTEGER_KEYS and not _is_int(value):
            raise StoreError(f"{where}: {key} must be an integer, got {value!r:.60}")
        if key in NUMBER_KEYS and not _is_number(value):
            raise StoreError(f"{where}: {key} must be a number, got {value!r:.60}")
    return point


class Store:
    """Open (or create) `path`; use as a context manager or call `close()`.

    `readonly=True` opens an existing store without creating or changing anything
    (`basin report` on a read-only run directory).
    """

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.conn = None
        try:
            if readonly:
                self.conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro",
                                            uri=True)
            else:
                self.conn = sqlite3.connect(self.path)
            # Any read of the schema fails at once on a file that is not SQLite.
            tables = {n for (n,) in self.conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not readonly and not {"groups", "members", "measures", "curves"} <= tables:
                self.conn.executescript(SCHEMA)
            self._group_columns = self._columns("groups")
        except sqlite3.Error as e:
            if self.conn is not None:
                self.conn.close()
            raise StoreError(f"{self.path} is not a readable Basin results store "
                             f"({e})") from None

    def _columns(self, table: str) -> set[str]:
        return {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self.conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot read the store ({e})") from None

    def finished_groups(self) -> set[str]:
        return {k for (k,) in self._query("SELECT key FROM groups")}

    def finished_hashes(self) -> dict[str, str | None]:
        """Stored group key -> the config hash of its members (None: a store written
        before hashes were kept)."""
        if "config_hash" not in self._group_columns:
            return {k: None for k in self.finished_groups()}
        return dict(self._query("SELECT key, config_hash FROM groups"))

    def timings(self) -> list[dict]:
        """Per stored group: its key, member count and seconds (total, compile, train,
        measure; None where a store from an earlier version did not keep them)."""
        cols = [c for c in TIMES if c in self._group_columns]
        rows = self._query(f"SELECT key, num_members, {', '.join(cols)} FROM groups "
                           "ORDER BY rowid")
        return [{"group": k, "members": n, **{c: None for c in TIMES},
                 **dict(zip(cols, (None if v is None else _num(v) for v in vals)))} for k, n, *vals in rows]

    def _free_ids(self, ids: list[int]) -> list[int]:
        """`ids` if none is taken, else the next free ids (a run directory that
        `--add` extended holds members of another study under the same indices)."""
        marks = ",".join("?" * len(ids))
        taken = self._query(f"SELECT count(*) FROM members WHERE id IN ({marks})",
                            tuple(ids))[0][0] if ids else 0
        if not taken:
            return ids
        (top,) = self._query("SELECT coalesce(max(id), -1) FROM members")[0]
        return [top + 1 + i for i in range(len(ids))]

    def write_group(self, key: str, members: Iterable[dict], seconds: float,
                    compile_seconds: float, config_hash: str | None = None,
                    train_seconds: float | None = None,
                    measure_seconds: float | None = None) -> None:
        """All of one group in a single transaction.

        Each member dict has `index`, `point` (the swept values), `status`, `steps`,
        `measures` (name → float) and `curves` (name → [(step, value), ...]).
        `config_hash` identifies the group's members (see `rundir.group_hash`);
        `seconds` = compile + train + measure seconds.
        """
        members = list(members)
        with self.conn:  # a store from an earlier version; reading never alters it
            for name, kind in LATER_COLUMNS.items():
                if name not in self._group_columns:
                    self.conn.execute(f"ALTER TABLE groups ADD COLUMN {name} {kind}")
        self._group_columns = self._columns("groups")
        if key in self.finished_groups():  # same key, other members (`--add`)
            key = f"{key}#{(config_hash or '')[:12]}"
        ids = self._free_ids([int(m["index"]) for m in members])
        with self.conn:  # commits on success, rolls back on any error
            self.conn.execute(
                "INSERT INTO groups (key, seconds, compile_seconds, num_members, "
                "config_hash, train_seconds, measure_seconds) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (key, seconds, compile_seconds, len(members), config_hash, train_seconds,
                 measure_seconds))
            for mid, m in zip(ids, members):
                self.conn.execute("INSERT INTO members VALUES (?, ?, ?, ?, ?)",
                                  (mid, key, json.dumps(m["point"], sort_keys=True),
                                   m["status"], int(m["steps"])))
                self.conn.executemany("INSERT INTO measures VALUES (?, ?, ?)",
                                      [(mid, k, _num(v)) for k, v in m["measures"].items()])
                for name, points in m["curves"].items():
                    self.conn.executemany("INSERT INTO curves VALUES (?, ?, ?, ?)",
                                          [(mid, name, int(s), _num(v))
                                           for s, v in points])

    def _value(self, value: Any, what: str) -> float:
        if value is None:
            return math.nan
        if not _is_number(value):
            raise StoreError(f"{self.path}: {what} must be a number, got {value!r:.60}")
        return float(value)

    def records(self) -> list[dict]:
        """One flat dict per member: swept values, status, steps and every measure."""
        rows = self._query("SELECT id, group_key, point, status, steps FROM members "
                           "ORDER BY id")
        measures: dict[int, dict] = {}
        for mid, name, value in self._query("SELECT member_id, name, value FROM measures"):
            if not isinstance(name, str) or name in ("member", "status", "steps"):
                raise StoreError(f"{self.path}: member {mid} has a measure named {name!r:.60}")
            measures.setdefault(mid, {})[name] = self._value(value, f"measure {name!r:.40}")
        out = []
        for mid, group, point, status, steps in rows:
            where = f"{self.path} (member {mid})"
            point = check_point(loads(point, where), where)
            if status not in STATUSES or not _is_int(steps):
                raise StoreError(f"{where}: status must be one of {', '.join(STATUSES)} "
                                 f"and steps an integer; got {status!r:.40}, {steps!r:.40}")
            rec = {"member": mid, **point, "status": status, "steps": steps}
            rec.update(measures.get(mid, {}))
            out.append(rec)
        return out

    def curves(self, name: str = "train_loss") -> dict[int, list[tuple[int, float]]]:
        out: dict[int, list] = {}
        for mid, step, value in self._query(
                "SELECT member_id, step, value FROM curves WHERE name = ? "
                "ORDER BY member_id, step", (name,)):
            if not _is_int(step):
                raise StoreError(f"{self.path}: a curve step must be an integer, got "
                                 f"{step!r:.40}")
            out.setdefault(mid, []).append((step, self._value(value, f"curve {name!r:.40}")))
        return out
