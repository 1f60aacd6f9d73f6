"""The results store: one SQLite file per run directory (standard library `sqlite3`).

Each finished group is written in one transaction (its members, their measures and
curves, and the group's row), so a run killed at any moment keeps every finished group
and never a half-written one; `--resume` skips the groups already present.
"""

from __future__ import annotations

import json
import math
import sqlite3
from pathlib import Path
from typing import Any, Iterable

SCHEMA = """
CREATE TABLE IF NOT EXISTS groups (
    key TEXT PRIMARY KEY, seconds REAL, compile_seconds REAL, num_members INTEGER);
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


def _num(x: Any) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


class Store:
    """Open (or create) `path`; use as a context manager or call `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.conn = sqlite3.connect(self.path)
        self.conn.executescript(SCHEMA)

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()

    def finished_groups(self) -> set[str]:
        return {k for (k,) in self.conn.execute("SELECT key FROM groups")}

    def write_group(self, key: str, members: Iterable[dict], seconds: float,
                    compile_seconds: float) -> None:
        """All of one group in a single transaction.

        Each member dict has `index`, `point` (the swept values), `status`, `steps`,
        `measures` (name → float) and `curves` (name → [(step, value), ...]).
        """
        members = list(members)
        with self.conn:  # commits on success, rolls back on any error
            self.conn.execute("INSERT INTO groups VALUES (?, ?, ?, ?)",
                              (key, seconds, compile_seconds, len(members)))
            for m in members:
                self.conn.execute("INSERT INTO members VALUES (?, ?, ?, ?, ?)",
                                  (m["index"], key, json.dumps(m["point"], sort_keys=True),
                                   m["status"], int(m["steps"])))
                self.conn.executemany("INSERT INTO measures VALUES (?, ?, ?)",
                                      [(m["index"], k, _num(v))
                                       for k, v in m["measures"].items()])
                for name, points in m["curves"].items():
                    self.conn.executemany("INSERT INTO curves VALUES (?, ?, ?, ?)",
                                          [(m["index"], name, int(s), _num(v))
                                           for s, v in points])

    def records(self) -> list[dict]:
        """One flat dict per member: swept values, status, steps and every measure."""
        rows = self.conn.execute(
            "SELECT id, group_key, point, status, steps FROM members ORDER BY id").fetchall()
        measures: dict[int, dict] = {}
        for mid, name, value in self.conn.execute("SELECT member_id, name, value FROM measures"):
            measures.setdefault(mid, {})[name] = float("nan") if value is None else value
        out = []
        for mid, group, point, status, steps in rows:
            rec = {"member": mid, **json.loads(point), "status": status, "steps": steps}
            rec.update(measures.get(mid, {}))
            out.append(rec)
        return out

    def curves(self, name: str = "train_loss") -> dict[int, list[tuple[int, float]]]:
        out: dict[int, list] = {}
        for mid, step, value in self.conn.execute(
                "SELECT member_id, step, value FROM curves WHERE name = ? "
                "ORDER BY member_id, step", (name,)):
            out.setdefault(mid, []).append((step, float("nan") if value is None else value))
        return out
