"""Block heterogeneity (Zhang et al. 2024): JS⁰ of the stored densities against scipy,
the summary as defined, and (slow) the whole study on a reduced budget with every
block's density finite (the transformer's qkv block included)."""

import itertools

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon

import experiments
from experiments import studies
from experiments.studies import block_heterogeneity as bh

SMALL = ["data.num_train=64", "data.num_test=32", "cnn.channels=[2, 2]",
         "spectrum.num_examples=32", "spectrum.chunk_size=32", "spectrum.probes=1",
         "spectrum.lanczos_steps=6", "compare.steps=4", "compare.batch_size=16",
         "compare.final_window=2", "compare.sgd_learning_rates=[0.1]",
         "compare.adam_learning_rates=[0.001]"]


@pytest.mark.slow   # a Lanczos compilation per block: about a minute on 2 busy cores
@pytest.mark.timeout(300)
def test_js0_is_the_mean_scipy_distance_of_the_stored_densities():
    cfg = experiments.load("block_heterogeneity", SMALL)
    _, loss_fn, params, train, _ = bh.setup(cfg, "cnn")
    sp = bh.spectrum(cfg, loss_fn, params, train)
    assert sp["names"] == ["convs/0", "convs/1", "head"]
    p = np.asarray(sp["probabilities"], np.float64)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    pairs = [jensenshannon(p[i], p[j]) for i, j in itertools.combinations(range(3), 2)]
    assert sp["js0"] == pytest.approx(np.mean(pairs), rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(np.asarray(sp["distances"])[0, 1], pairs[0], rtol=1e-3,
                               atol=1e-6)


def test_summary_takes_the_best_of_each_grid(tmp_path):
    def run(opt, lr, loss):
        return {"optimizer": opt, "learning_rate": lr, "final_loss": loss,
                "test_accuracy": 0.5, "curve": [2.0, loss]}
    done = {"spectrum/cnn": {"js0": 0.1, "names": ["a", "b"], "grid": [0.0, 1.0],
                             "probabilities": [[0.5, 0.5], [0.9, 0.1]]},
            "train/cnn/momentum/0.1": run("momentum", 0.1, 0.3),
            "train/cnn/momentum/0.3": run("momentum", 0.3, None),   # diverged
            "train/cnn/adam/0.001": run("adam", 0.001, 0.1),
            "train/cnn/adam/0.003": run("adam", 0.003, 0.2)}
    (row,) = bh.summary(done).values()
    assert row["sgd"]["learning_rate"] == 0.1 and row["adam"]["learning_rate"] == 0.001
    assert row["gap"] == pytest.approx(0.2) and row["blocks"] == 2
    studies.save_json(tmp_path / "config.json", experiments.load("block_heterogeneity"))
    studies.save_json(tmp_path / studies.RESULTS, done)
    lines = bh.report(tmp_path)
    assert (tmp_path / "block_heterogeneity.png").stat().st_size > 5000
    assert any(line.startswith("| cnn | 2 | 0.100 |") for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_study_runs_with_finite_densities_for_every_block(tmp_path):
    # The spectra at the config's 512 examples; training cut to 300 steps, one
    # learning rate each.
    res = experiments.run("block_heterogeneity", out=tmp_path / "bh", overrides=[
        "data.num_train=1000", "compare.steps=300", "compare.sgd_learning_rates=[0.03]",
        "compare.adam_learning_rates=[0.001]"])
    done = studies.results(res.path)
    for model in bh.MODELS:
        sp = done[f"spectrum/{model}"]
        assert np.all(np.isfinite(sp["probabilities"])), model
        assert 0 < sp["js0"] < np.sqrt(np.log(2)), model
    assert "blocks/0/qkv" in done["spectrum/transformer"]["names"]
    rows = bh.summary(done)
    assert all(r["gap"] is not None for r in rows.values())
    assert experiments.write_report(res.path).is_file()
