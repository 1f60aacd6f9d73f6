"""SAM on small data (Foret et al. 2021) on a reduced budget, and the premise of the
study's config: SAM at ρ = 0 is heavy-ball SGD (optax's own), step for step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import experiments
import transforms as tx
from experiments.studies import sam_small_data


def test_sam_at_rho_zero_is_optax_momentum_sgd():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w": jax.random.normal(k1, (5, 3)), "b": jnp.zeros(3)}
    x, y = jax.random.normal(k2, (32, 5)), jax.random.randint(k3, (32,), 0, 3)

    def loss_fn(p, batch):
        logits = batch[0] @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    sam = tx.make("sam", learning_rate=0.1, momentum=0.9, rho=0.0)
    ref = optax.sgd(0.1, momentum=0.9)

    @jax.jit
    def sam_step(p, s, batch, key):
        return tx.train_step(sam, loss_fn, p, s, batch, key)[:2]

    @jax.jit
    def ref_step(p, s, batch):
        u, s = ref.update(jax.grad(loss_fn)(p, batch), s, p)
        return optax.apply_updates(p, u), s

    p_sam, s_sam, p_ref, s_ref = params, sam.init(params), params, ref.init(params)
    for t in range(5):
        batch = (x[6 * t: 6 * t + 8], y[6 * t: 6 * t + 8])
        p_sam, s_sam = sam_step(p_sam, s_sam, batch, jax.random.key(t))
        p_ref, s_ref = ref_step(p_ref, s_ref, batch)
    for a, b in zip(jax.tree.leaves(p_sam), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sam_finds_flatter_minima_that_test_better(tmp_path):
    res = experiments.run("sam_small_data", out=tmp_path / "run", overrides=[
        "sweep.optimizer.rho=[0.0, 0.2]", "sweep.seed=[0, 1]", "train.steps=1500"])
    records = res.records()
    assert all(r["status"] == "finished" for r in records), records

    def mean(rho, key):
        return np.mean([r[key] for r in records if r["optimizer.rho"] == rho])

    assert mean(0.2, "lambda_max") < mean(0.0, "lambda_max")
    assert mean(0.2, "test_accuracy") > mean(0.0, "test_accuracy")
    stats = sam_small_data.compare(records)
    assert stats[0.2]["test_accuracy"][0] == pytest.approx(mean(0.2, "test_accuracy"))
    text = experiments.write_report(res.path).read_text()
    assert "## SAM on small data" in text and (res.path / "sam_small_data.png").is_file()
