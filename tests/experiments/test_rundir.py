"""The run-directory building blocks: atomic writes, the lock, names, hashes, and the
store written before group hashes were kept (issue 17, items 9, 10, 11, 15, 16)."""

import json
import os
import sqlite3
from pathlib import Path

import jax
import pytest

from experiments import config as cfglib
from experiments import rundir
from experiments.store import Store

TINY = str(Path(__file__).with_name("tiny.toml"))


def test_atomic_write_keeps_the_old_file_when_the_write_dies(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    rundir.atomic_write(target, '{"old": 1}')
    assert target.read_text() == '{"old": 1}'
    assert target.stat().st_mode & 0o777 == 0o666 & ~rundir._umask()

    def dies(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", dies)  # as if killed between write and rename
    with pytest.raises(rundir.RunDirError, match="No space left"):
        rundir.atomic_write(target, '{"new": 2}' * 1000)
    assert target.read_text() == '{"old": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temporary left


def test_atomic_write_refuses_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "report.md").symlink_to(victim)
    with pytest.raises(rundir.RunDirError, match="symbolic link"):
        rundir.atomic_write(tmp_path / "report.md", "# overwritten")
    assert victim.read_text() == "precious"


def test_the_lock_refuses_a_second_holder_and_is_released_on_close(tmp_path):
    first = rundir.RunDir(tmp_path, {}, lock_fd=rundir.lock(tmp_path))
    # flock conflicts between two opens of the file, even in one process.
    with pytest.raises(rundir.RunDirError, match=f"pid {os.getpid()}"):
        rundir.lock(tmp_path)
    first.close()
    rundir.RunDir(tmp_path, {}, lock_fd=rundir.lock(tmp_path)).close()


def test_only_process_zero_of_a_distributed_run_takes_the_lock(tmp_path, monkeypatch):
    held = rundir.lock(tmp_path)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    assert rundir.lock(tmp_path) is None  # a sibling process writes beside process 0
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    with pytest.raises(rundir.RunDirError, match="in use"):
        rundir.lock(tmp_path)
    os.close(held)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", "..", "", " ", 5, None])
def test_names_that_are_not_plain_file_names_are_refused(name):
    with pytest.raises(cfglib.ConfigError, match="name must be a plain file name"):
        rundir.check_name(name)


def test_plain_names_pass():
    for name in ("tiny", "sam-small_data.v2", "λ study"):
        assert rundir.check_name(name) == name


def test_fingerprint_is_canonical():
    a = {"b": [1, 2.5], "a": {"y": "z", "x": None}}
    b = json.loads(json.dumps({"a": {"x": None, "y": "z"}, "b": [1, 2.5]}, indent=4))
    assert rundir.fingerprint(a) == rundir.fingerprint(b)
    assert rundir.fingerprint(a) != rundir.fingerprint({**a, "b": [1, 2.0]})
    assert rundir.fingerprint({"v": 1}) != rundir.fingerprint({"v": 1.0})


def test_grid_size_counts_without_expanding():
    cfg = cfglib.load(TINY)
    assert cfglib.grid_size(cfg) == len(cfglib.expand(cfg)) == 8
    assert cfglib.grid_size({"sweep": {"a": list(range(1000)), "b": list(range(1000))}}) \
        == 1_000_000
    assert cfglib.grid_size({"name": "custom"}) == 1


def _old_store(path: Path, key: str) -> None:
    """A store in the schema before group hashes (no config_hash column)."""
    with sqlite3.connect(path) as c:
        c.executescript("""
            CREATE TABLE groups (key TEXT PRIMARY KEY, seconds REAL, compile_seconds REAL,
                                 num_members INTEGER);
            CREATE TABLE members (id INTEGER PRIMARY KEY, group_key TEXT NOT NULL,
                                  point TEXT NOT NULL, status TEXT NOT NULL,
                                  steps INTEGER NOT NULL);
            CREATE TABLE measures (member_id INTEGER NOT NULL, name TEXT NOT NULL,
                                   value REAL, PRIMARY KEY (member_id, name));
            CREATE TABLE curves (member_id INTEGER NOT NULL, name TEXT NOT NULL,
                                 step INTEGER NOT NULL, value REAL);""")
        c.execute("INSERT INTO groups VALUES (?, 1, 1, 4)", (key,))


def test_a_store_from_before_hashes_is_matched_on_keys_unless_mixed(tmp_path):
    cfg = cfglib.load(TINY)
    groups = list(cfglib.groups(cfg).items())
    _old_store(tmp_path / "results.sqlite", groups[0][0])
    with Store(tmp_path / "results.sqlite") as store:
        assert store.finished_hashes() == {groups[0][0]: None}
        assert [k for k, _, _ in rundir.pending(groups, store)] == [groups[1][0]]
        assert len(rundir.pending(groups, store, mixed=True)) == 2


def test_added_groups_get_fresh_keys_and_member_ids(tmp_path):
    cfg = cfglib.load(TINY)
    (key, members), _ = cfglib.groups(cfg).items()
    row = {"index": 0, "point": {"seed": 0}, "status": "finished", "steps": 1,
           "measures": {"m": 1.0}, "curves": {}}
    with Store(tmp_path / "results.sqlite") as store:
        store.write_group(key, [row], 1.0, 0.5, "a" * 64)
        store.write_group(key, [row], 1.0, 0.5, "b" * 64)  # same key and index
        assert store.finished_hashes() == {key: "a" * 64, f"{key}#bbbbbbbbbbbb": "b" * 64}
        assert [r["member"] for r in store.records()] == [0, 1]


def test_reading_an_old_store_does_not_change_it_and_writing_adds_the_hash(tmp_path):
    db = tmp_path / "results.sqlite"
    _old_store(db, "k")
    before = db.read_bytes()
    with Store(db) as store:
        store.records()
        store.finished_hashes()
    assert db.read_bytes() == before
    row = {"index": 7, "point": {"seed": 0}, "status": "finished", "steps": 1,
           "measures": {}, "curves": {}}
    with Store(db) as store:
        store.write_group("k2", [row], 1.0, 0.5, "c" * 64)
        assert store.finished_hashes() == {"k": None, "k2": "c" * 64}
        assert [t["train_seconds"] for t in store.timings()] == [None, None]
        store.write_group("k3", [row | {"index": 8}], 3.0, 1.0, "d" * 64, 1.5, 0.5)
        assert store.timings()[-1] == {"group": "k3", "members": 1, "seconds": 3.0,
                                       "compile_seconds": 1.0, "train_seconds": 1.5,
                                       "measure_seconds": 0.5}
        assert store.timings()[0]["seconds"] == 1.0  # the old row keeps what it had

