"""Jastrzębski et al.'s η/B: on a reduced grid, λ_max at the end of training falls as
the ratio of learning rate to batch size grows."""

import numpy as np
import pytest

import experiments
from experiments.studies import lr_over_batch


def _ranks(v):
    # average ranks for ties, written out (1-based)
    v = np.asarray(v, float)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def test_spearman_is_the_pearson_correlation_of_ranks():
    rng = np.random.default_rng(0)
    records = [{"batch_size": int(b), "learning_rate": float(lr), "lambda_max": float(l)}
               for b, lr, l in zip(rng.choice([32, 128, 512], 12),
                                   rng.choice([0.05, 0.1, 0.2], 12), rng.random(12))]
    records.append({"batch_size": 32, "learning_rate": 0.1, "lambda_max": float("nan")})
    rho, _, n = lr_over_batch.spearman(records)
    ok = records[:-1]
    x = _ranks([r["learning_rate"] / r["batch_size"] for r in ok])
    y = _ranks([r["lambda_max"] for r in ok])
    assert n == 12
    assert rho == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)


@pytest.mark.slow
def test_sharpness_falls_with_lr_over_batch(tmp_path):
    res = experiments.run("lr_over_batch", out=tmp_path / "run", overrides=[
        "data.num_train=1000", "sweep.batch_size=[32, 256]", "sweep.learning_rate=[0.1, 0.4]",
        "sweep.seed=[0]", "train.steps=4000", "measure.num_examples=500"])
    records = [r for r in res.records() if r["status"] != "diverged"]
    assert len(records) == 4, res.records()
    rho, _, _ = lr_over_batch.spearman(records)
    assert rho < -0.5, records
    flattest = max(records, key=lr_over_batch.ratio)
    sharpest = min(records, key=lr_over_batch.ratio)
    assert flattest["lambda_max"] < sharpest["lambda_max"]
    text = experiments.write_report(res.path).read_text()
    assert "Spearman" in text and (res.path / "lr_over_batch.png").is_file()
