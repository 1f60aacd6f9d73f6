"""What the store and the report read back from a run directory anyone can edit:
crafted points, values and names (issue 17, items 14 and 17). The run directories are
written by hand (config + store), so nothing trains."""

import json
import math
import re
import sqlite3
from pathlib import Path

import pytest
from matplotlib.figure import Figure

import experiments
from experiments import config as cfglib
from experiments.cli import main
from experiments.report import escape, heatmap_cells
from experiments.store import Store, StoreError, json_depth

TINY = str(Path(__file__).with_name("tiny.toml"))


def _member(i, bs, lr, seed, status="finished", acc=0.8):
    nan = status == "diverged"
    value = math.nan if nan else acc
    return {"index": i, "point": {"batch_size": bs, "learning_rate": lr, "seed": seed},
            "status": status, "steps": 40,
            "measures": {"train_loss": math.nan if nan else 0.5, "train_accuracy": value,
                         "test_accuracy": value, "accuracy_gap": math.nan if nan else 0.1 * i,
                         "lambda_max": math.nan if nan else 1.0 + i},
            "curves": {"train_loss": [(10, 1.0), (20, 0.5)]}}


def _run_dir(path: Path, members, overrides=()) -> Path:
    """A run directory as the runner leaves it, for the members given."""
    path.mkdir()
    cfg = cfglib.load(TINY, list(overrides))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    with Store(path / "results.sqlite") as store:
        store.write_group('{"train.batch_size": 16}', members, 1.0, 0.5, "h")
    return path


def _grid(tmp_path):
    return _run_dir(tmp_path / "run", [_member(i, 16, lr, s) for i, (lr, s) in enumerate(
        [(0.05, 0), (0.05, 1), (1000.0, 0), (1000.0, 1)])])


def _set_point(run: Path, text: str, member: int = 0):
    with sqlite3.connect(run / "results.sqlite") as c:
        c.execute("UPDATE members SET point = ? WHERE id = ?", (text, member))


@pytest.mark.parametrize("point, says", [
    ('{"batch_size": 16, "learning_rate": "fast", "seed": 0}', "learning_rate must be a number"),
    ('[16, 0.05, 0]', "must be a mapping, got list"),
    ('{"batch_size": 16.5, "learning_rate": 0.1, "seed": 0}', "batch_size must be an integer"),
    ('{"status": "converged"}', "may not set 'status'"),
    ("[" * 200_000 + "]" * 200_000, "nested deeper than"),
    ('{"batch_size": 16', "not valid JSON"),
])
def test_crafted_points_are_one_line_errors_naming_the_store(tmp_path, capsys, point, says):
    run = _grid(tmp_path)
    _set_point(run, point)
    with Store(run / "results.sqlite") as store, pytest.raises(StoreError, match=says) as e:
        store.records()
    assert str(run / "results.sqlite") in str(e.value)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and not (run / "report.md").exists()


def test_crafted_values_and_statuses_are_refused(tmp_path):
    run = _grid(tmp_path)
    with sqlite3.connect(run / "results.sqlite") as c:
        c.execute("UPDATE measures SET value = 'high' WHERE member_id = 1")
    with Store(run / "results.sqlite") as store, pytest.raises(StoreError,
                                                               match="must be a number"):
        store.records()
    run2 = _run_dir(tmp_path / "run2", [_member(0, 16, 0.05, 0)])
    with sqlite3.connect(run2 / "results.sqlite") as c:
        c.execute("UPDATE members SET status = '<b>ok</b>'")
    with Store(run2 / "results.sqlite") as store, pytest.raises(StoreError, match="status"):
        store.records()


def test_json_depth_against_json_itself():
    for text in ['{"a": [1, {"b": "[[[{"}]}', "[]", "3", '"\\\\"', '["\\"[", [[]]]']:
        def depth(v):
            if isinstance(v, dict):
                return 1 + max(map(depth, v.values()), default=0)
            if isinstance(v, list):
                return 1 + max(map(depth, v), default=0)
            return 0
        assert json_depth(text) == depth(json.loads(text)), text


def test_garbage_store_is_a_store_error(tmp_path):
    bad = tmp_path / "results.sqlite"
    bad.write_bytes(b"\x00garbage" * 512)
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"{bad} is not a readable Basin results store"):
            Store(bad, readonly=readonly)


def test_names_are_escaped_in_the_report(tmp_path):
    evil = '<script>alert(1)</script> ![x](http://evil.example/p.png) a|b'
    run = _run_dir(tmp_path / "run", [_member(0, 16, 0.05, 0), _member(1, 16, 0.05, 1)],
                   overrides=[f"description={json.dumps(evil)}",
                              'name="n<img src=x onerror=alert(1)>"'])
    for i in (0, 1):
        _set_point(run, json.dumps({"batch_size": 16, "learning_rate": 0.05, "seed": i,
                                    "optimizer.name": evil}), i)
    cfg = json.loads((run / "config.json").read_text())
    cfg["sweep"]["optimizer.name"] = ["sgd"]
    (run / "config.json").write_text(json.dumps(cfg))
    text = experiments.write_report(run).read_text()
    assert "<script>" not in text and "<img" not in text
    assert re.search(r"(?<!\\)\]\(http", text) is None  # no live link or image
    assert "&lt;script&gt;" in text and escape(evil) in text
    # The members table keeps its columns: a '|' in a name is escaped, not a cell break.
    row = next(ln for ln in text.splitlines() if ln.startswith("| 16 |"))
    header = next(ln for ln in text.splitlines() if ln.startswith("| batch_size"))
    assert row.replace("\\|", "").count("|") == header.count("|")


def test_escape_leaves_plain_names_alone():
    assert escape("lambda_max of batch 16, lr 0.05") == "lambda_max of batch 16, lr 0.05"
    assert escape("a\nb") == "a b" and escape("x & y") == "x &amp; y"


# -- item 14 --------------------------------------------------------------------------

def test_diverged_members_are_marked_on_the_heatmap(tmp_path, monkeypatch):
    # One of two seeds diverged at lr 0.05 and both at lr 1000.
    run = _run_dir(tmp_path / "run", [
        _member(0, 16, 0.05, 0, acc=0.7), _member(1, 16, 0.05, 1, "diverged"),
        _member(2, 16, 1000.0, 0, "diverged"), _member(3, 16, 1000.0, 1, "diverged")])
    texts = {}
    real = Figure.savefig

    def capture(fig, target, **kw):
        texts[len(texts)] = [t.get_text() for ax in fig.axes for t in ax.texts]
        return real(fig, target, **kw)

    monkeypatch.setattr(Figure, "savefig", capture)
    experiments.write_report(run)
    heat = next(t for t in texts.values() if t)  # the figure with cell labels
    assert heat[:2] == ["0.7\n(1/2 div.)", "diverged"]


def test_heatmap_cells_by_hand():
    recs = [{"batch_size": 8, "learning_rate": lr, "status": st, "a": v} for lr, st, v in
            [(0.1, "finished", 1.0), (0.1, "finished", 3.0), (0.2, "diverged", math.nan),
             (0.2, "finished", 5.0)]] + [{"batch_size": 16, "learning_rate": 0.1,
                                          "status": "finished", "a": 7.0}]
    grid, labels = heatmap_cells(recs, "a")
    assert grid[0].tolist() == [2.0, 5.0] and grid[1, 0] == 7.0 and math.isnan(grid[1, 1])
    assert labels == [["2", "5\n(1/2 div.)"], ["7", "—"]]


def test_a_single_point_sweep_says_it_needs_two_points(tmp_path):
    run = _run_dir(tmp_path / "run", [_member(0, 16, 0.05, 0)])
    text = experiments.write_report(run).read_text()
    assert "needs ≥ 2 points" in text
    assert "Kendall τ |" not in text and "|  |" not in text
