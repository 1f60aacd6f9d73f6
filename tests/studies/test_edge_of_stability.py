"""Edge of stability (Cohen et al. 2021): under full-batch GD with MSE, λ_max rises to
2/η and hovers there, for each step size."""

import numpy as np
import pytest

import experiments
from experiments.store import Store
from experiments.studies import edge_of_stability as eos


def test_summary_reads_the_records_as_defined(tmp_path):
    # A hand-made store: λ rises linearly to 2/η = 4 by step 100, then sits at 4 ± 0.2.
    steps = np.arange(0, 220, 20)
    lam = np.where(steps <= 100, 1.0 + 3.0 * steps / 100, 4.0 + 0.2 * (-1.0) ** (steps // 20))
    (tmp_path / "config.json").write_text(
        '{"optimizer": {"learning_rate": 0.5}, "sweep": {"learning_rate": [0.5]}}')
    with Store(tmp_path / "results.sqlite") as store:
        store.write_group("g", [{
            "index": 0, "point": {"learning_rate": 0.5}, "status": "finished",
            "steps": 200, "measures": {"train_loss": 0.1},
            "curves": {"lambda_max": list(zip(steps.tolist(), lam.tolist())),
                       "train_loss": [(20, 1.0), (200, 0.1)]}}], 1.0, 0.5)
    (row,) = eos.summary(tmp_path)
    assert row["edge"] == 4.0 and row["lambda_start"] == 1.0
    assert row["dip_step"] == 0 and row["lambda_dip"] == 1.0
    assert row["lambda_peak"] == pytest.approx(lam.max())
    assert row["reached_step"] == int(steps[np.nonzero(lam >= 3.6)[0][0]])
    late = lam[len(lam) // 2:]
    assert row["late_median"] == pytest.approx(np.median(late))
    assert row["late_ratio"] == pytest.approx(np.median(late) / 4.0)
    lines = eos.report(tmp_path)
    assert (tmp_path / "edge_of_stability.png").stat().st_size > 5000
    assert any(line.startswith("| 0.5 | 4 |") for line in lines)


@pytest.mark.slow
def test_sharpness_rises_to_two_over_eta_and_hovers_there(tmp_path):
    # Reduced budget: 500 examples, 2000 steps (the config: 1000 examples, 3000 steps).
    res = experiments.run("edge_of_stability", out=tmp_path / "eos", overrides=[
        "data.num_train=500", "train.batch_size=500", "record.num_examples=500",
        "measure.num_examples=500", "train.steps=2000"])
    rows = eos.summary(res.path)
    assert len(rows) == 3
    curves = res.curves("lambda_max")
    for row in rows:
        assert row["status"] == "finished", row
        lam = np.array([v for _, v in curves[row["member"]]])
        steps = np.array([s for s, _ in curves[row["member"]]])
        # Progressive sharpening: after the first steps λ_max sits well below 2/η ...
        assert 0 < row["dip_step"] <= 400 and row["lambda_dip"] < 0.85 * row["edge"], row
        assert lam[steps == row["dip_step"]][0] == row["lambda_dip"]
        # ... then rises to it ...
        assert row["reached_step"] is not None and row["reached_step"] > row["dip_step"]
        # ... and hovers there: the late-phase median within ±20% of 2/η.
        assert 0.8 < row["late_ratio"] < 1.2, row
    # The training loss still falls at the edge of stability.
    assert all(r["train_loss"] < 0.35 for r in rows)
    assert experiments.write_report(res.path).is_file()
