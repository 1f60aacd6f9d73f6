"""Escaping a saddle: GD's escape time against its closed form, momentum's growth rate,
and noise escaping where GD never does."""

import math

import jax
import numpy as np
import pytest

import experiments
from experiments import config as cfglib
from experiments.studies import saddle_escape as se


def _cfg(**kw):
    cfg = experiments.load("saddle_escape", ["max_steps=500", "seeds=6"])
    return experiments.validate({**cfg, **kw})


def test_gd_escape_steps_match_the_quadratic_closed_form():
    # Without the quartic term and the stable offset, v_t = δ (1 + ημ)^t exactly.
    cfg = _cfg(quartic=0.0, stable_offset=0.0)
    ds = [1e-1, 1e-3, 1e-6, 1e-9, 1e-12]
    steps = se.escape_steps(cfg, "gd", ds, jax.random.split(jax.random.key(0), 1))[:, 0]
    predicted = [math.ceil(se.gd_steps_predicted(d, cfg)) for d in ds]
    np.testing.assert_allclose(steps, predicted, atol=1)
    # Momentum: the same logarithm with the heavy-ball rate z₊ (transient aside).
    steps_m = se.escape_steps(cfg, "momentum", ds, jax.random.split(jax.random.key(0), 1))
    slope = np.polyfit(np.log(1 / np.asarray(ds)), steps_m[:, 0], 1)[0]
    assert slope == pytest.approx(1 / math.log(se.momentum_rate(cfg)), rel=0.03)
    assert np.all(steps_m[:, 0] < steps)


def test_gd_grows_like_log_inverse_distance_and_noise_escapes_the_manifold():
    cfg = _cfg()
    out = {m: se.run_method(cfg, m) for m in se.METHODS}
    ds = out["gd"]["distances"]
    assert ds[-1] == 0.0
    gd = out["gd"]["median"]
    slope = se.log_slope(ds, gd)
    assert slope == pytest.approx(1 / math.log(1 + cfg["learning_rate"]), rel=0.02)
    # On the stable manifold GD and momentum never leave; noise and kicks always do.
    assert gd[-1] is None and out["momentum"]["median"][-1] is None
    for m in ("noisy_gd", "perturbed_gd"):
        assert out[m]["escaped_fraction"][-1] == 1.0
        # ... and below the noise level their escape time no longer grows with ln(1/δ).
        assert out[m]["median"][-2] < 0.6 * gd[-2]
        assert abs(out[m]["median"][-2] - out[m]["median"][-1]) <= 0.2 * out[m]["median"][-1]


@pytest.mark.slow
def test_the_study_runs_and_reports(tmp_path):
    res = experiments.run("saddle_escape", overrides=["max_steps=400", "seeds=4",
                                          "distances=[1e-2, 1e-6]"], out=tmp_path)
    assert set(res.summary()) == set(se.METHODS)
    text = experiments.write_report(tmp_path).read_text()
    assert "| 0 |" in text and (tmp_path / "saddle_escape.png").is_file()


def test_bad_config_is_a_config_error():
    with pytest.raises(cfglib.ConfigError, match="distances"):
        experiments.load("saddle_escape", ["distances=[1.0]"])
    with pytest.raises(cfglib.ConfigError, match="methods"):
        experiments.load("saddle_escape", ['methods=["newton"]'])
