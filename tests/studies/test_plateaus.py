"""Plateaus: measured stage times of deep linear networks against Saxe et al.'s analytic
prediction (closed form for depth 2, the balanced-mode ODE by quadrature for depth 3)."""

import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

import experiments
from experiments import config as cfglib
from experiments.studies import plateaus as pl


def _cfg(**kw):
    cfg = experiments.load("plateaus", ["steps=700", "depths=[1, 2]",
                                   "singular_values=[3.0, 2.0, 1.0]"])
    return experiments.validate({**cfg, **kw})


def test_depth_two_stage_times_match_the_logistic_solution():
    cfg = _cfg()
    out = pl.train(cfg, 2)
    eps, lr = cfg["init_strength"], cfg["learning_rate"]
    for s, t in zip(cfg["singular_values"], out["stage_times"]):
        # Saxe et al. 2014: t_½ = τ/(2s) ln((s − ε₀)/ε₀), τ = 1/η. Discrete steps of
        # size ηs <= 0.03 lag the continuous solution by about ηs/2: 3% tolerance.
        predicted = 1 / lr / (2 * s) * math.log((s - eps) / eps)
        assert t == pytest.approx(predicted, rel=0.03)
    # Stronger modes first, each after a plateau: the loss is flat before the first.
    assert np.all(np.diff(out["stage_times"]) > 0)
    first = out["stage_times"][0]
    loss = np.asarray(out["loss"])
    steps = np.asarray(out["steps"])
    assert loss[steps < 0.5 * first].min() > 0.95 * loss[0]
    # ... and by 1.5x the stage time the strongest mode's share ½s₁² is mostly gone.
    s1 = cfg["singular_values"][0]
    assert loss[steps <= 1.5 * first].min() < loss[0] - 0.8 * 0.5 * s1 ** 2


def test_depth_one_has_no_plateau_and_depth_three_follows_its_ode():
    cfg = _cfg(steps=1000)
    t1 = pl.train(cfg, 1)["stage_times"]
    # Linear regression: every mode relaxes with the same time constant τ = 1/η.
    np.testing.assert_allclose(t1, 1 / cfg["learning_rate"] * math.log(2), rtol=0.03)
    t3 = pl.train(cfg, 3)["stage_times"]
    for s, t in zip(cfg["singular_values"], t3):
        # The quadrature against a plain ODE integration of τu̇ = 3u^{4/3}(s − u).
        sol = solve_ivp(lambda _, u: 3 * u ** (4 / 3) * (s - u) * cfg["learning_rate"],
                        (0, 5000), [cfg["init_strength"]], events=lambda _, u: u[0] - s / 2,
                        rtol=1e-10, atol=1e-14)
        ode = sol.t_events[0][0]
        assert pl.predicted_stage_time(s, cfg["init_strength"], 3,
                                       cfg["learning_rate"]) == pytest.approx(ode, rel=1e-5)
        if ode < cfg["steps"]:
            assert t == pytest.approx(ode, rel=0.03)


def test_bad_config_is_a_config_error():
    with pytest.raises(cfglib.ConfigError, match="singular_values"):
        experiments.load("plateaus", ["singular_values=[1.0, 1.0]"])
    with pytest.raises(cfglib.ConfigError, match="depths"):
        experiments.load("plateaus", ["depths=[0]"])
