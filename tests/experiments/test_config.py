"""Config parsing, overrides, grid expansion and every user error of the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import experiments
import transforms as tx
from experiments import config as cfglib
from experiments import studies
from experiments.cli import main

TINY = str(Path(__file__).with_name("tiny.toml"))


def test_grid_expands_and_groups_by_shape():
    cfg = cfglib.load(TINY)
    members = cfglib.expand(cfg)
    assert len(members) == 2 * 2 * 2
    assert {m.get("train.batch_size") for m in members} == {16, 64}
    groups = cfglib.groups(cfg)
    # learning rate and seed are vmapped; batch size changes shapes
    assert len(groups) == 2 and all(len(g) == 4 for g in groups.values())


def test_overrides_are_toml_literals_with_shorthands():
    cfg = cfglib.load(TINY, ["train.steps=7", "sweep.seed=[3]", 'name="x"',
                             'optimizer.name="momentum"', "optimizer.momentum=0.5",
                             "sweep.optimizer.nesterov=[true, false]"])
    assert cfg["train"]["steps"] == 7 and cfg["sweep"]["seed"] == [3]
    assert cfg["name"] == "x" and cfg["optimizer"]["momentum"] == 0.5
    assert cfg["sweep"]["optimizer.nesterov"] == [True, False]
    # a boolean sweep changes the program: it splits groups, floats do not
    assert set(cfglib.vmapped_paths(cfg)) == {"train.seed", "optimizer.learning_rate"}
    assert len(cfglib.groups(cfg)) == 2 * 2
    assert cfglib.load(TINY, ["batch_size=32", "sweep.batch_size=[8]"])["train"]["batch_size"] == 32


def test_default_config_grid_and_measures_without_running_it():
    cfg = cfglib.load(None)
    sweep = cfg["sweep"]
    assert min(sweep["batch_size"]) <= 16 and max(sweep["batch_size"]) >= 1024
    assert len(sweep["batch_size"]) >= 4 and len(sweep["learning_rate"]) >= 3
    assert len(sweep["seed"]) >= 2
    assert {"lambda_max", "trace"} <= set(cfg["measure"]["measures"])
    assert cfg["data"]["name"] == "mnist1d" and cfg["model"]["name"] == "mlp"
    assert cfg["train"]["until_train_loss"] > 0  # trained towards near-zero loss
    assert {"worst_case", "adaptive"} <= set(cfg["measure"]["measures"])
    assert "sharpness_vs_generalization" in cfglib.list_configs()


@pytest.mark.parametrize("args, message", [
    (["--set", "train.stepz=3"], "unknown config key 'train.stepz'"),
    (["--set", "train.steps=\"many\""], "train.steps must be an integer >= 0"),
    (["--set", "sweep.learning_rate=[-0.1]"], "learning_rate must be a number > 0"),
    (["--set", "sweep.batch_size=[100000]"], "larger than the training set"),
    (["--set", "measure.measures=[\"curvyness\"]"], "measure.measures must be a list drawn from"),
    (["--set", "steps"], "--set expects key=value"),
    (["--set", "model.hidden=[0]"], "model.hidden"),
    (["--set", "optimizer.name=\"rmsprpo\""], "Unknown optimizer 'rmsprpo'; valid choices"),
    (["--set", "optimizer.rhoo=3"], "Unknown hyper-parameter(s) 'rhoo'"),
])
def test_cli_user_errors_are_one_line_without_traceback(args, message, tmp_path):
    proc = subprocess.run(timeout=600, args=[sys.executable, "-m", "experiments.cli", "run", TINY, *args,
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unreadable_and_unknown_configs(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed\n")
    for target, message in [(str(bad), "cannot read config"),
                            ("no_such_study", "no config 'no_such_study'")]:
        proc = subprocess.run(timeout=600, args=[sys.executable, "-m", "experiments.cli", "run", target],
                              capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = subprocess.run(timeout=600, args=[sys.executable, "-m", "experiments.cli", "report",
                           str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a run directory" in proc.stderr


def test_cli_list_names_the_shipped_configs():
    proc = subprocess.run(timeout=600, args=[sys.executable, "-m", "experiments.cli", "list"],
                          capture_output=True, text=True, check=True)
    assert "sharpness_vs_generalization" in proc.stdout


def test_cli_lists_optimizers_and_prints_configs_and_the_reference(capsys):
    assert main(["list", "--optimizers"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert [r.split()[0] for r in rows] == [n for n, _, _ in tx.describe()]
    assert {"sam", "shampoo", "adamw", "muon"} <= {r.split()[0] for r in rows}
    assert main(["config", "large_batch", "--set", "train.steps=7"]) == 0
    assert json.loads(capsys.readouterr().out) == experiments.load("large_batch",
                                                                   ["train.steps=7"])
    assert main(["config", "--reference"]) == 0
    assert capsys.readouterr().out == cfglib.reference(studies.tables()) + "\n"
    assert main(["config", "--reference", "tiny"]) == 2
    assert "drop the config" in capsys.readouterr().err


def test_only_optimizers_that_accept_traced_values_get_vmapped_hyperparameters():
    sam = cfglib.load(TINY, ['optimizer.name="sam"', "sweep.optimizer.rho=[0.01, 0.05]"])
    assert "optimizer.rho" in cfglib.vmapped_paths(sam)
    assert len(cfglib.groups(sam)) == 2  # batch sizes only
    # Shampoo's float hyper-parameters may be traced too; an optax optimizer's are not.
    sh = cfglib.load(TINY, ['optimizer.name="shampoo"', "sweep.optimizer.b2=[0.99, 0.999]"])
    assert "optimizer.b2" in cfglib.vmapped_paths(sh)
    assert len(cfglib.groups(sh)) == 2
    ada = cfglib.load(TINY, ['optimizer.name="adabelief"', "sweep.optimizer.b1=[0.8, 0.9]"])
    assert "optimizer.b1" not in cfglib.vmapped_paths(ada)
    assert len(cfglib.groups(ada)) == 2 * 2


def test_unknown_study_is_a_config_error(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('name = "x"\nstudy = "no_such_study"\n')
    with pytest.raises(cfglib.ConfigError, match="study must be one of sweep"):
        experiments.load(str(path))


def test_shorthands_are_for_sweep_configs_only():
    # A custom study's own `learning_rate` or `seed` is not the sweep's optimizer table.
    raw = {"study": "saddle_escape", "learning_rate": 0.2}
    assert cfglib.apply_overrides({"study": "saddle_escape"}, ["learning_rate=0.2"]) == raw
    sweep = cfglib.apply_overrides({"sweep": {}}, ["learning_rate=0.2"])
    assert sweep["optimizer"] == {"learning_rate": 0.2}


def test_sweep_override_on_a_custom_study_is_a_config_error():
    with pytest.raises(cfglib.ConfigError, match="no \\[sweep\\] table"):
        experiments.load("ravine", ["sweep.seed=[0, 1]"])
