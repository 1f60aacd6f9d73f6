"""`preconditioned_lambda_max` recorded along training: λ₁(P⁻¹H) with Adam's P = √v̂ + ε
read from each member's optimizer state inside the group program, against full-batch
Adam written with optax and a dense D^{-1/2} H D^{-1/2} (numpy eigvalsh)."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import experiments
from experiments.data import mnist1d
from experiments.train import build_model, loss_function

TINY = str(Path(__file__).parent / "tiny.toml")
EPS = 1e-6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # b2 vmapped (a traced hyper-parameter), eps fixed in [optimizer] (a static one).
    return experiments.run(TINY, out=tmp_path_factory.mktemp("pre") / "r", overrides=[
        'optimizer.name="adam"', f"optimizer.eps={EPS}", "sweep.batch_size=[256]",
        "sweep.learning_rate=[0.01]", "sweep.seed=[1]", "sweep.optimizer.b2=[0.99, 0.9]",
        "record.every=20", 'record.measures=["lambda_max", "preconditioned_lambda_max"]',
        "record.num_examples=128", "record.chunk_size=64", "record.lanczos_steps=40",
        'measure.measures=["lambda_max"]'])


def _adam_by_hand(model_cfg, b2):
    """Full-batch Adam (lr 0.01) on the 256 examples: (params, ν, t) at steps 20, 40."""
    data = mnist1d()
    x, y = jnp.asarray(data.x_train[:256]), jnp.asarray(data.y_train[:256])
    model = build_model(model_cfg, 40, 10)
    loss_fn = loss_function(model.apply_fn, "cross_entropy")
    params = model.init(jax.random.split(jax.random.key(1), 3)[0])
    opt = optax.adam(0.01, b2=b2, eps=EPS)
    state = opt.init(params)
    grad = jax.jit(jax.grad(loss_fn))
    out = {}
    for t in range(1, 41):
        updates, state = opt.update(grad(params, (x, y)), state)
        params = optax.apply_updates(params, updates)
        if t % 20 == 0:
            out[t] = (params, state[0].nu)
    return loss_fn, (x[:128], y[:128]), out


@pytest.mark.timeout(300)
def test_recorded_preconditioned_sharpness_equals_a_dense_reference(run):
    for rec in run.records():
        b2 = rec["optimizer.b2"]
        loss_fn, sub, states = _adam_by_hand(run.config["model"], b2)
        curve = run.curves("preconditioned_lambda_max")[rec["member"]]
        raw = dict(run.curves("lambda_max")[rec["member"]])
        got = {s: v for s, v in curve if not math.isnan(v)}
        assert sorted(got) == [20, 40], curve   # step 0: no second moment yet
        for t, (params, nu) in states.items():
            flat, unravel = ravel_pytree(params)
            dense = np.asarray(jax.hessian(lambda f: loss_fn(unravel(f), sub))(flat),
                               np.float64)
            d = np.sqrt(np.asarray(ravel_pytree(nu)[0], np.float64) / (1 - b2 ** t)) + EPS
            pre = dense / np.sqrt(np.outer(d, d))
            want = np.linalg.eigvalsh(0.5 * (pre + pre.T))[-1]
            np.testing.assert_allclose(got[t], want, rtol=2e-2)
            assert got[t] > 10 * raw[t]   # P⁻¹ magnifies the curvature Adam sees
