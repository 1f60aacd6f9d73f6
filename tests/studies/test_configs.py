"""Every shipped config loads and validates, and names a known study."""

import pytest

import experiments
from experiments import config as cfglib
from experiments import studies


@pytest.mark.parametrize("name", cfglib.list_configs())
def test_every_shipped_config_loads(name):
    cfg = experiments.load(name)
    assert cfg["study"] in studies.names()
    assert cfg["description"], f"configs/{name}.toml needs a description"
