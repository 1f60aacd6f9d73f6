"""Keskar et al.'s large-batch gap on a reduced budget: trained to the same loss, the
large batch ends sharper (λ_max and ε-sharpness) and tests worse."""

import numpy as np
import pytest

import experiments
from experiments.studies import large_batch

REDUCED = ["data.num_train=2000", "data.num_test=1000", "sweep.batch_size=[32, 1000]",
           "sweep.seed=[0, 1]", "train.until_train_loss=0.05", "train.steps=8000",
           "measure.num_examples=500", "measure.ascent_steps=10"]


@pytest.mark.slow
def test_large_batches_are_sharper_and_test_worse(tmp_path):
    res = experiments.run("large_batch", overrides=REDUCED, out=tmp_path / "run")
    records = res.records()
    assert all(r["status"] == "converged" for r in records), records

    def mean(batch, key):
        return np.mean([r[key] for r in records if r["batch_size"] == batch])

    assert mean(1000, "lambda_max") > mean(32, "lambda_max")
    assert mean(1000, "keskar") > mean(32, "keskar")
    assert mean(1000, "test_accuracy") < mean(32, "test_accuracy")

    # The report's table is the plain mean and sample std over seeds.
    stats = large_batch.compare(records)
    for batch in (32, 1000):
        vals = [r["lambda_max"] for r in records if r["batch_size"] == batch]
        assert stats[batch]["lambda_max"][0] == pytest.approx(np.mean(vals))
        assert stats[batch]["lambda_max"][1] == pytest.approx(np.std(vals, ddof=1))
    text = experiments.write_report(res.path).read_text()
    assert "## Large-batch gap" in text and (res.path / "large_batch.png").is_file()
