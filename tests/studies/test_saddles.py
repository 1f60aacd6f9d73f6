"""Saddles dominate, on a reduced budget: the index of the points found grows with their
loss, and only points below the tolerance are called critical."""

import numpy as np
import pytest
from scipy import stats

import experiments
from experiments import config as cfglib
from experiments.studies import saddles as sd


@pytest.mark.slow
def test_index_grows_with_loss(tmp_path):
    res = experiments.run("saddles", overrides=["checkpoints=5", "perturbations=1", "train_steps=1000",
                                    "finder.steps=60", "finder.cg_steps=30"], out=tmp_path)
    pts = sd.points_of(res.path)
    assert len(pts) == 10
    for p in pts:   # the flag is the tolerance, nothing else
        assert p["converged"] == (p["grad_norm"] <= p["tol"])
        assert p["grad_norm"] < p["start_grad_norm"]
    loss = [p["loss"] for p in pts]
    index = [p["index"] for p in pts]
    assert stats.kendalltau(loss, index).statistic > 0.5
    assert stats.spearmanr(loss, index).statistic > 0.6
    # the lowest-loss point is (close to) a minimum, the highest-loss one a saddle
    assert index[int(np.argmin(loss))] < 0.01 < index[int(np.argmax(loss))]
    assert "converged" in experiments.write_report(res.path).read_text()


def test_bad_config_is_a_config_error():
    with pytest.raises(cfglib.ConfigError, match="finder.method"):
        experiments.load("saddles", ['finder.method="newton"'])
    with pytest.raises(cfglib.ConfigError, match="tol_relative"):
        experiments.load("saddles", ["finder.tol_relative=0"])
