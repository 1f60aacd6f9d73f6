"""Critical batch size: the hyperbola fit recovers known parameters, the tuning rule
takes the fastest fully converged learning rate, and on a reduced budget SGD's steps
to a loss target fall with the batch size with diminishing returns."""

import math

import numpy as np
import pytest
from scipy import optimize

import experiments
from experiments.studies import critical_batch_size as cbs


def test_fit_recovers_a_noise_free_hyperbola():
    b = np.array([8, 16, 32, 64, 128, 256, 512, 1024])
    s = 300.0 * (1 + 120.0 / b)
    s_min, b_noise = cbs.fit_steps_batch(b, s)
    assert s_min == pytest.approx(300.0, rel=1e-9)
    assert b_noise == pytest.approx(120.0, rel=1e-9)
    # E = B·S lies on E_min (1 + B/B_noise) with E_min = S_min·B_noise.
    np.testing.assert_allclose(b * s, s_min * b_noise * (1 + b / b_noise), rtol=1e-9)


def test_fit_matches_scipy_on_noisy_steps():
    rng = np.random.default_rng(0)
    b = np.array([16, 32, 64, 128, 256, 512, 1024, 2048], float)
    s = 250.0 * (1 + 400.0 / b) * np.exp(rng.normal(0, 0.05, b.size))
    s_min, b_noise = cbs.fit_steps_batch(b, s)
    # The same weighted least squares (relative residuals), solved by scipy.
    ref = optimize.least_squares(lambda p: (p[0] * (1 + p[1] / b) - s) / s, x0=[100., 100.])
    assert s_min == pytest.approx(ref.x[0], rel=1e-6)
    assert b_noise == pytest.approx(ref.x[1], rel=1e-6)
    assert 0.8 < b_noise / 400.0 < 1.25


def test_fit_needs_two_points():
    assert all(math.isnan(v) for v in cbs.fit_steps_batch([64], [100]))
    assert all(math.isnan(v) for v in cbs.fit_steps_batch([64, 128], [100, math.nan]))


def test_tuned_steps_takes_the_fastest_fully_converged_learning_rate():
    def rec(bs, lr, seed, status, steps, ns=100.0):
        return {"batch_size": bs, "learning_rate": lr, "seed": seed, "status": status,
                "steps": steps, "noise_scale": ns}

    rows = cbs.tuned_steps([
        rec(32, 0.1, 0, "converged", 800), rec(32, 0.1, 1, "converged", 1000),
        rec(32, 0.4, 0, "converged", 300), rec(32, 0.4, 1, "diverged", 2),
        rec(32, 0.2, 0, "converged", 600, 50.), rec(32, 0.2, 1, "converged", 700, 70.),
        rec(64, 0.1, 0, "unconverged", 5000), rec(64, 0.1, 1, "unconverged", 5000)])
    assert len(rows) == 1  # no learning rate converged at batch 64
    assert rows[0]["learning_rate"] == 0.2 and rows[0]["steps"] == 650
    assert rows[0]["examples"] == 32 * 650 and rows[0]["noise_scale"] == 60.0


def test_noise_scale_is_read_where_the_loss_is_near_the_target():
    rows = [{"members": [0, 1]}, {"members": [2]}]
    train = {0: [(100, 0.9), (200, 0.25), (300, 0.12), (400, 0.09)],
             1: [(200, 0.31), (400, 0.2)], 2: [(200, 0.1)]}
    noise = {0: [(0, 1.0), (200, 2.0), (400, 3.0), (300, 7.0)], 1: [(200, 4.0), (400, 5.0)],
             2: [(200, math.nan)]}
    # Member 0 at steps 200 and 300 (loss 0.25, 0.12 in [0.1, 0.3]); member 1 at 400;
    # member 2's reading is not finite.
    assert sorted(cbs.noise_scale_near_target(rows, train, noise, 0.1)) == [2.0, 5.0, 7.0]


@pytest.mark.slow
def test_steps_fall_with_batch_size_then_saturate(tmp_path):
    res = experiments.run("critical_batch_size", out=tmp_path / "run", overrides=[
        "train.until_train_loss=0.3", "train.steps=4000", "measure.num_examples=1000",
        "sweep.batch_size=[32, 128, 512]", "sweep.learning_rate=[0.2, 0.8, 1.6]"])
    rows = cbs.tuned_steps(res.records())
    assert [r["batch_size"] for r in rows] == [32, 128, 512]
    s = {r["batch_size"]: r["steps"] for r in rows}
    # Below the critical batch size a 4x larger batch saves most of the steps...
    assert s[128] < s[32] / 2
    # ...above it, the examples spent grow: E = B·S rises from 32 to 512.
    assert 512 * s[512] > 1.5 * 32 * s[32]
    s_min, b_noise = cbs.fit_steps_batch(list(s), list(s.values()))
    assert 0 < s_min < s[512] and 32 < b_noise < 2048
    simple = np.median([r["noise_scale"] for r in rows])
    assert b_noise / 10 < simple < 10 * b_noise
    along = cbs.noise_scale_near_target(rows, res.curves("train_loss"),
                                        res.curves("noise_scale"), 0.3)
    assert len(along) >= 3 and b_noise / 10 < np.median(along) < 10 * b_noise
    lines = cbs.report(res.path)
    assert any(f"B_noise = {b_noise:.3g}" in line for line in lines)
    assert (res.path / "critical_batch_size.png").stat().st_size > 10_000
