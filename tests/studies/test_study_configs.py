"""The typed configs of the custom studies: each study's `Config` holds its defaults, the
shipped TOML only what differs, and every bad key is a one-line error naming it."""

import dataclasses
import typing

import pytest

import experiments
from experiments import config as cfglib
from experiments import schema, studies
from experiments.cli import main

CUSTOM = sorted(studies.tables())


def _plain_keys(table, where=""):
    """(dotted key, field type) of every non-table key of a table, nested ones too."""
    hints = typing.get_type_hints(table)
    for f in dataclasses.fields(table):
        key = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _plain_keys(hints[f.name], key)
        else:
            yield key, hints[f.name]


def _flatten(raw: dict, where=""):
    for k, v in raw.items():
        key = f"{where}.{k}" if where else k
        yield from (_flatten(v, key) if isinstance(v, dict) else [(key, v)])


def _one_line_error(study, override, names):
    """`override` ("key=value") applied to the raw TOML as a path (`--set` would read
    `learning_rate` and `seed` as the sweep's shorthands)."""
    raw = cfglib.read(study)
    key, value = cfglib.parse_override(override)
    node = raw
    for part in key.split(".")[:-1]:
        node = node.setdefault(part, {})
    node[key.split(".")[-1]] = value
    with pytest.raises(schema.ConfigError) as e:
        experiments.load(raw)
    message = str(e.value)
    assert "\n" not in message and names in message, message
    return message


def test_the_custom_studies_are_these():
    assert CUSTOM == ["block_heterogeneity", "gradient_flow", "mode_connectivity", "plateaus", "ravine", "reparameterization",
                      "saddle_escape", "saddles", "skip_connections"]


@pytest.mark.parametrize("study", CUSTOM)
def test_shipped_config_resolves_to_its_values_over_the_defaults(study):
    raw = cfglib.read(study)
    cfg = experiments.load(study)
    defaults = schema.defaults(studies.tables()[study])
    assert set(cfg) == set(defaults) and cfg["study"] == study
    given = dict(_flatten(raw))
    for key, value in _flatten(defaults):
        want = given.get(key, value)
        assert cfglib.get_path(cfg, key) == (list(want) if isinstance(want, tuple)
                                             else want), key


@pytest.mark.parametrize("study", CUSTOM)
def test_shipped_config_holds_only_what_differs_from_the_defaults(study):
    defaults = schema.defaults(studies.tables()[study])
    for key, value in _flatten(cfglib.read(study)):
        if key not in ("name", "description", "study"):
            assert cfglib.get_path(defaults, key) != value, (
                f"configs/{study}.toml repeats the default of {key}")


@pytest.mark.parametrize("study", CUSTOM)
def test_unknown_key_names_the_key(study):
    _one_line_error(study, "no_such_key=1", "'no_such_key'")
    tables = {k.rsplit(".", 1)[0] for k, _ in _plain_keys(studies.tables()[study])
              if "." in k}
    for table in tables:   # an open table (ravine's hyper.*) names the optimizer's error
        message = _one_line_error(study, f"{table}.no_such_key=1", "no_such_key")
        assert table in message, message


def _wrong(tp):
    """A TOML literal of the wrong type for a field of type `tp`."""
    if tp in (int, float) or typing.get_origin(tp) is tuple:
        return '"x"'
    return "1"   # str, Literal, bool


@pytest.mark.parametrize("study", CUSTOM)
def test_every_key_of_the_wrong_type_names_the_key(study):
    for key, tp in _plain_keys(studies.tables()[study]):
        if key == "study":   # picks the module: an unknown study is its own error
            continue
        _one_line_error(study, f"{key}={_wrong(tp)}", key)


BAD_VALUES = {
    "block_heterogeneity": ["cnn.channels=[]", "transformer.num_heads=3",
                            "compare.sgd_learning_rates=[]", 'compare.sgd="nope"',
                            "compare.final_window=100000", "spectrum.num_examples=5000"],
    "gradient_flow": ["depth=2", "gains=[1.0, 0.0]", "activations=[]",
                      "num_examples=4001"],
    "plateaus": ["init_strength=0.3", "singular_values=[1.0, 1.0]", "depths=[0]"],
    "ravine": ["quadratic.learning_rates.adam=[1.0, 0.1]", "quadratic.start=[0.0]",
               "hyper.momentum.momentum=1.5", "hyper.adam.b3=0.5"],
    "reparameterization": ["rescale.layer=2", "train.batch_size=4001",
                           'train.optimizer="nope"', "measure.num_examples=5000"],
    "saddle_escape": ["momentum=1.0", "distances=[0.5]", "stable_offset=0.5",
                      'methods=["newton"]'],
    "saddles": ['finder.method="newton"', "finder.tol_relative=0", "perturbations=-1"],
    "mode_connectivity": ["train.seed_b=0", "curve.kinds=[]", 'curve.kinds=["line"]',
                          "curve.batch_size=4001", "model.hidden=[]"],
    "skip_connections": ["surface.points=2", "measure.lanczos_steps=1",
                         "data.num_test=1001", 'name="a/b"'],
}


@pytest.mark.parametrize("study", CUSTOM)
def test_bad_values_are_one_line_errors_naming_the_key(study):
    for override in BAD_VALUES[study]:
        key = override.split("=")[0].split(".")[-1]
        _one_line_error(study, override, key)


def test_resolved_config_validates_again_unchanged():
    for study in CUSTOM:
        cfg = experiments.load(study)
        assert experiments.validate(cfg) == cfg


def test_partial_override_of_a_nested_table_keeps_its_other_defaults():
    cfg = experiments.load("ravine", ["hyper.kfac.damping=0.01",
                                      "quadratic.learning_rates.sgd=[0.2, 1.0]"])
    defaults = schema.defaults(studies.tables()["ravine"])
    assert cfg["hyper"]["kfac"] == {**defaults["hyper"]["kfac"], "damping": 0.01}
    assert cfg["quadratic"]["learning_rates"] == {
        **defaults["quadratic"]["learning_rates"], "sgd": [0.2, 1.0]}


def test_basin_run_with_a_bad_study_key_exits_2_and_creates_nothing(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    for override in ["quadratic.no_such_key=1", "quadratic.steps=0"]:
        rc = main(["run", "ravine", "--set", override, "--out", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, lines
        assert len(lines) == 1 and "quadratic." in lines[0], lines
    assert list(tmp_path.iterdir()) == []


def test_reference_has_a_section_per_custom_study():
    text = cfglib.reference(studies.tables())
    for study in CUSTOM:
        section = text.split(f"## Study `{study}`\n", 1)[1].split("\n## ", 1)[0]
        for key, _ in _plain_keys(studies.tables()[study]):
            table, _, name = key.rpartition(".")
            assert f"### `[{table}]`" in section if table else "### top level" in section
            assert f"| `{name}` |" in section, (study, key)
    assert "## Study" not in cfglib.reference()


@pytest.mark.parametrize("study", CUSTOM)
def test_a_config_naming_only_the_study_takes_every_default(study):
    cfg = experiments.load({"study": study})
    assert cfg == schema.defaults(studies.tables()[study])
    assert cfg["name"] == cfg["study"] == study and cfg["description"] == ""
