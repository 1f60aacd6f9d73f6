"""Issue 17, items 7 and 13: every bad value is one line, exit 2, before anything exists.

Each case failed on the hand-checked dict configs (a traceback, or a run directory
with config.json and results.sqlite left behind, or a value silently read as 1).
"""

from pathlib import Path

import pytest

from experiments.cli import main

TINY = str(Path(__file__).with_name("tiny.toml"))


@pytest.mark.parametrize("sets, says", [
    (["data.num_train=100000"], "data.num_train = 100000 is more than"),
    (["data.num_test=0"], "data.num_test"),
    (['model.activation="relu6x"'], "model.activation"),
    (['data.num_train="64"'], "data.num_train"),
    (["data.num_train=64.5"], "data.num_train"),
    (["sweep.seed=[4294967296]"], "seed"),
    ([f"train.steps={2**63 - 1}"], "train.steps"),
    (["description=5"], "description"),
    (["train=5"], "train"),
    (["sweep.batch_size=[true]"], "batch_size"),
    (["train.batch_size=true", "sweep.batch_size=[16]"], "batch_size"),
    (["model.hidden=[true]"], "model.hidden"),
])
def test_bad_values_are_one_line_errors_before_anything_exists(capsys, tmp_path, sets, says):
    args = [a for s in sets for a in ("--set", s)]
    assert main(["run", TINY, *args, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("basin: error: ") and "\n" not in err and says in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_a_missing_path_is_not_shadowed_by_a_shipped_name(capsys, tmp_path):
    missing = tmp_path / "some" / "dir" / "large_batch.toml"
    assert main(["run", str(missing), "--out", str(tmp_path / "r")]) == 2
    assert f"no config file {missing}" in capsys.readouterr().err
    assert main(["run", "large_batch.toml", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
