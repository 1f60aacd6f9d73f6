"""`basin run` / `basin report` on awkward run directories: each user error is one line
on stderr and exit 2, without a traceback, and nothing is created before the error
(issue 17, items 8, 9, 10, 11, 15, 16, 18)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
from experiments import config as cfglib
from experiments import grid, rundir
from experiments.cli import main

TINY = str(Path(__file__).with_name("tiny.toml"))
ROOT = Path(__file__).resolve().parents[2]
# One member, ten steps: a real run in seconds.
ONE = ["--set", "sweep.batch_size=[16]", "--set", "sweep.learning_rate=[0.05]",
       "--set", "sweep.seed=[0]", "--set", "train.steps=10",
       "--set", 'measure.measures=["lambda_max"]']


def _cli(capsys, *args):
    rc = main([str(a) for a in args])
    err = capsys.readouterr().err
    return rc, err.strip().splitlines()


def _one_error(capsys, *args, says=""):
    rc, lines = _cli(capsys, *args)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("basin: error: "), lines
    assert says in lines[0], lines
    return lines[0]


def _listing(path: Path):
    return sorted((str(p.relative_to(path)), p.stat().st_size if p.is_file() else -1)
                  for p in path.rglob("*"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-member run, and what it logged."""
    logged = []
    out = tmp_path_factory.mktemp("trained") / "run"
    experiments.run(TINY, overrides=ONE[1::2], out=out, log=logged.append)
    return out, logged


def _copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained[0], tmp_path / "copy"))


# -- item 8: the run directory itself -------------------------------------------------

def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    target = tmp_path / "f"
    target.write_text("x")
    _one_error(capsys, "run", TINY, "--out", target, says="is not a directory")
    assert target.read_text() == "x" and _listing(tmp_path) == [("f", 1)]
    _one_error(capsys, "run", TINY, "--out", target / "sub", says="is not a directory")


def test_empty_out_is_refused_and_writes_nothing_here(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _one_error(capsys, "run", TINY, "--out", "", says="--out must name a directory")
    assert _listing(tmp_path) == []


def test_resume_with_another_out_is_refused(capsys, trained, tmp_path):
    before = _listing(trained[0])
    _one_error(capsys, "run", "--resume", trained[0], "--out", tmp_path / "other",
               says="drop --out")
    assert not (tmp_path / "other").exists() and _listing(trained[0]) == before


def _deny_writes_to(monkeypatch, *paths):
    """Make `os.access` report `paths` read-only (the tests run as root, where a
    chmod does not stop writes)."""
    denied = {str(p) for p in paths}
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k:
                        False if str(p) in denied and mode & os.W_OK else real(p, mode, *a, **k))


def test_read_only_parent_and_read_only_out_are_refused(capsys, tmp_path, monkeypatch):
    parent, existing = tmp_path / "ro", tmp_path / "ro_out"
    parent.mkdir()
    existing.mkdir()
    _deny_writes_to(monkeypatch, parent, existing)
    _one_error(capsys, "run", TINY, "--out", parent / "a" / "b", says=f"{parent} is not writable")
    _one_error(capsys, "run", TINY, "--out", existing, says=f"{existing} is not writable")
    assert _listing(parent) == [] and _listing(existing) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_chmod_read_only_parent_is_refused(capsys, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        _one_error(capsys, "run", TINY, "--out", parent / "a", says="not writable")
    finally:
        parent.chmod(0o755)


def test_report_on_a_read_only_run_is_one_line(capsys, trained, tmp_path, monkeypatch):
    run = _copy(trained, tmp_path)
    before = _listing(run)
    _deny_writes_to(monkeypatch, run)
    _one_error(capsys, "report", run, says="cannot write the report")
    assert _listing(run) == before


# -- item 9: damaged runs -------------------------------------------------------------

@pytest.mark.parametrize("text, says", [
    ("", "is empty"),
    ('{"name": "tin', "not valid JSON"),
    ("{}", "holds no run config"),
    ("not json at all", "not valid JSON"),
    ("[" * 200_000 + "]" * 200_000, "nested deeper"),
    ('{"name": "tiny", "study": "sweep"}', "is not a valid run config"),
])
def test_resume_of_a_damaged_config_names_the_file(capsys, trained, tmp_path, text, says):
    run = _copy(trained, tmp_path)
    (run / "config.json").write_text(text)
    before = _listing(run)
    line = _one_error(capsys, "run", "--resume", run, says=says)
    assert str(run / "config.json") in line
    assert _listing(run) == before  # no lock file, no store, no report
    _one_error(capsys, "report", run, says=str(run / "config.json"))


def test_resume_validates_the_stored_config_as_a_new_one(capsys, trained, tmp_path):
    run = _copy(trained, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    cfg["sweep"]["batch_size"] = [0]
    (run / "config.json").write_text(json.dumps(cfg))
    # The same message `basin run` gives for a new config with this value.
    new = _one_error(capsys, "run", TINY, "--set", "sweep.batch_size=[0]",
                     "--out", tmp_path / "new")
    stored = _one_error(capsys, "run", "--resume", run, says=str(run / "config.json"))
    assert new.split("error: ")[1] in stored and not (tmp_path / "new").exists()


def test_garbage_store_is_named_on_resume_run_and_report(capsys, trained, tmp_path):
    run = _copy(trained, tmp_path)
    (run / "results.sqlite").write_bytes(b"this is not sqlite" * 100)
    before = _listing(run)
    for args in (["run", "--resume", run], ["report", run], ["run", TINY, *ONE, "--out", run]):
        _one_error(capsys, *args, says=f"{run / 'results.sqlite'} is not a readable")
    assert _listing(run) == before


# -- item 10: a run directory holds one study -----------------------------------------

def test_a_different_study_is_refused_and_added_only_when_asked(capsys, trained, tmp_path):
    run = _copy(trained, tmp_path)
    config = (run / "config.json").read_text()
    before = _listing(run)
    other = [*ONE, "--set", "train.steps=20", "--set", "sweep.learning_rate=[0.01]"]
    _one_error(capsys, "run", TINY, *other, "--out", run,
               says=f"{run} holds a different study; use another --out or --resume")
    assert (run / "config.json").read_text() == config and _listing(run) == before
    # Same config again: nothing to do, nothing changed in the store.
    rc, lines = _cli(capsys, "run", TINY, *ONE, "--out", run, "--no-report")
    assert rc == 0 and any("1 already finished" in ln for ln in lines)
    assert len(experiments.Results(run).records()) == 1
    # --add: the new member is trained beside the old one; the old config is kept.
    rc, lines = _cli(capsys, "run", TINY, *other, "--out", run, "--add", "--no-report")
    assert rc == 0, lines
    recs = experiments.Results(run).records()
    assert sorted((r["learning_rate"], r["steps"]) for r in recs) == [(0.01, 20), (0.05, 10)]
    kept = list(run.glob("config-*.json"))
    assert len(kept) == 1 and kept[0].read_text().strip() == config.strip()
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 20


def test_groups_are_matched_on_their_members_configs_not_their_key(trained, tmp_path):
    # Same batch size (the group key), other steps: the stored group is not this one.
    cfg = cfglib.load(TINY, ONE[1::2] + ["train.steps=20"])
    groups = list(cfglib.groups(cfg).items())
    with experiments.store.Store(trained[0] / "results.sqlite") as store:
        assert store.finished_groups() == {groups[0][0]}
        assert [k for k, _, _ in rundir.pending(groups, store)] == [groups[0][0]]
        same = list(cfglib.groups(cfglib.load(TINY, ONE[1::2])).items())
        assert rundir.pending(same, store) == []


# -- item 11: one writer at a time ----------------------------------------------------

def test_a_second_writer_is_refused_with_the_holders_pid(capsys, trained, tmp_path):
    run = _copy(trained, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from experiments import rundir; rundir.lock(Path(sys.argv[1])); "
         "print('locked', flush=True); sys.stdin.read()", str(run)],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        store = (run / "results.sqlite").read_bytes()
        for args in (["run", "--resume", run], ["run", TINY, *ONE, "--out", run]):
            _one_error(capsys, *args, says=f"in use by another basin run (pid {holder.pid})")
        assert (run / "results.sqlite").read_bytes() == store
    finally:
        holder.communicate("")
    # Released with its holder: the run continues.
    rc, lines = _cli(capsys, "run", "--resume", run, "--no-report")
    assert rc == 0, lines


# -- item 15: the default directory stays under runs/ ---------------------------------

@pytest.mark.parametrize("name", ["../escape", "/abs/path", "a/b", "..", "x\\y"])
def test_names_that_leave_runs_are_refused(capsys, tmp_path, monkeypatch, name):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _one_error(capsys, "run", TINY, "--set", f"name={json.dumps(name)}",
               says="name must be a plain file name")
    assert _listing(tmp_path) == [("work", -1)]


# -- item 16: symbolic links are refused, never followed ------------------------------

@pytest.mark.parametrize("name", ["report.md", "config.json", "heatmaps.png",
                                  "results.sqlite"])
def test_symlinks_in_a_run_directory_are_not_followed(capsys, trained, tmp_path, name):
    run = _copy(trained, tmp_path)
    victim = tmp_path / "victim"
    if name in ("config.json", "results.sqlite"):  # a valid target: same study
        shutil.copy(run / name, victim)
        if name == "config.json":  # compact, so a rewrite would show
            victim.write_text(json.dumps(json.loads(victim.read_text())))
    else:
        victim.write_text("precious")
    content = victim.read_bytes()
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    cmds = [["report", run]] if name.endswith((".md", ".png")) else []
    cmds += [["run", TINY, *ONE, "--out", run], ["run", "--resume", run]]
    for args in cmds:
        _one_error(capsys, *args, says="symbolic link")
    assert victim.read_bytes() == content


# -- item 18: huge grids --------------------------------------------------------------

def test_a_huge_grid_is_refused_before_it_is_expanded(capsys, tmp_path):
    big = ["--set", f"sweep.seed={list(range(2501))}"]  # 2 x 2 x 2501 = 10 004 members
    _one_error(capsys, "run", TINY, *big, "--out", tmp_path / "r",
               says="the grid has 10,004 members, above the limit of 10,000; pass --yes")
    assert _listing(tmp_path) == []
    with pytest.raises(cfglib.ConfigError, match="10,004 members"):
        experiments.run(cfglib.load(TINY) | {"sweep": {"seed": list(range(10_004))}},
                        out=tmp_path / "py")
    cfglib.check_sweep({"sweep": {"seed": list(range(10_004))}}, allow_large=True)


def test_yes_lets_a_large_grid_through(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(grid, "MAX_MEMBERS", 4)  # tiny.toml has 8 members
    _one_error(capsys, "run", TINY, "--out", tmp_path / "r", says="8 members")
    (tmp_path / "file").write_text("")
    # Past the grid check, the next error is about the directory.
    _one_error(capsys, "run", TINY, "--yes", "--out", tmp_path / "file",
               says="is not a directory")


def test_the_grid_size_is_logged_before_training(trained):
    logged = trained[1]
    assert "a grid of 1 member(s)" in logged[0] and "group" in logged[-1]


def test_a_run_stores_where_each_groups_time_went(trained, tmp_path):
    res = experiments.Results(_copy(trained, tmp_path))
    (t,) = res.timings()
    assert t["members"] == 1 and t["train_seconds"] > 0 and t["measure_seconds"] >= 0
    parts = t["compile_seconds"] + t["train_seconds"] + t["measure_seconds"]
    assert t["seconds"] == pytest.approx(parts, rel=1e-6)
    text = experiments.write_report(res.path).read_text()
    assert "1 group(s) took" in text and "training" in text
