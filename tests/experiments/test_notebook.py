"""The notebook tour (experiments/notebooks/tour.ipynb) runs top to bottom in a fresh
kernel, so it never falls out of step with the code. Needs the `test` extra's nbclient,
nbformat and ipykernel."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

TOUR = Path(__file__).resolve().parents[2] / "experiments" / "notebooks" / "tour.ipynb"

# Appended to the executed copy only: reads the tour's own variables and checks them
# against plain definitions (numbers must be finite and ordered, the SAM run differs from
# the SGD run, the sweep's store holds every member of the grid).
CHECKS = """
import math, sqlite3
import numpy as np
vals = np.asarray(eig.values)
assert vals.shape == (3,) and np.all(np.diff(vals) <= 1e-4 * abs(vals[0])), vals
assert math.isfinite(float(tr.value)) and float(tr.value) > 0
np.testing.assert_allclose(np.sum(den.weights, axis=1), 1.0, atol=1e-3)
assert surface.train_loss.shape == (11, 11)
centre = float(surface.train_loss[5, 5])
assert np.isclose(centre, float(loss_fn(sgd_params, train)), rtol=1e-4), centre
assert float(sam_losses[-1]) == float(sam_losses[-1]) and not np.allclose(
    jax.flatten_util.ravel_pytree(sam_params)[0], jax.flatten_util.ravel_pytree(sgd_params)[0])
with sqlite3.connect(results.path / "results.sqlite") as conn:
    assert conn.execute("SELECT COUNT(*) FROM members").fetchone()[0] == 6
assert report.is_file()
print("checks passed")
"""


@pytest.mark.slow
def test_the_tour_runs_and_draws_its_figures(tmp_path):
    nb = nbformat.read(TOUR, as_version=4)
    assert all(c.get("outputs", []) == [] for c in nb.cells if c.cell_type == "code"), \
        "commit the tour with its outputs cleared"
    nb.cells.append(nbformat.v4.new_code_cell("import jax.flatten_util\n" + CHECKS))
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [c.outputs for c in nb.cells if c.cell_type == "code"]
    images = sum(any("image/png" in o.get("data", {}) for o in out) for out in outputs)
    assert images == 3, f"expected 3 figures (density, surface, sweep), got {images}"
    text = "".join(o.get("text", "") for out in outputs for o in out)
    assert "checks passed" in text
    assert text.count("seed") == 6, text
