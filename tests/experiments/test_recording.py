"""What the runner records along training, checked against a plain training loop:
label noise, the L2 penalty, test curves with early stopping's record, and curvature
(λ_max, λ_min, the index, per-layer gradient norms, the noise scale) at record steps
inside the one compiled group program."""

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
import pytest

import experiments
import landscape as ls
from experiments import config as cfglib
from experiments.data import mnist1d, randomize_labels
from experiments.data import load as load_data
from experiments.measures import RecordSettings
from experiments.program import Settings
from experiments.train import build_model, loss_function
from tests import subprocess_env

TINY = str(Path(__file__).with_name("tiny.toml"))
L2 = 0.01
RECORDED = ["lambda_max", "lambda_min", "index", "grad_norms", "noise_scale"]


# ------------------------------------------------------------------ label noise ---

@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 1.0])
def test_label_noise_redraws_the_fraction_and_keeps_the_class_balance(fraction):
    y = mnist1d().y_train
    n, k = y.shape[0], 10
    noisy = randomize_labels(y, fraction, k, seed=3)
    assert noisy.labels.dtype == np.int32 and noisy.labels.shape == y.shape
    assert noisy.redrawn.sum() == round(fraction * n)  # exactly the requested fraction
    changed = noisy.labels != y
    assert not np.any(changed & ~noisy.redrawn)  # nothing outside the redrawn set moves
    # Each redrawn label is uniform over the k classes: it changes with p = (k-1)/k.
    m, p = noisy.redrawn.sum(), (k - 1) / k
    assert abs(changed.sum() - m * p) <= 4 * math.sqrt(m * p * (1 - p)) + 1e-9
    # Class counts: (1 - f)·c_k kept plus a Binomial(m, 1/k) share of the redrawn ones.
    kept = np.bincount(y[~noisy.redrawn], minlength=k)
    counts = np.bincount(noisy.labels, minlength=k)
    sd = math.sqrt(m * (1 / k) * (1 - 1 / k))
    assert np.all(np.abs(counts - kept - m / k) <= 4 * sd + 1e-9)
    if 0 < fraction:
        # Balanced before (MNIST-1D's 10 classes), balanced after within tolerance.
        assert np.all(np.abs(counts / n - 0.1) < 0.03)
    again = randomize_labels(y, fraction, k, seed=3)
    np.testing.assert_array_equal(again.labels, noisy.labels)
    if 0 < fraction < 1:
        other = randomize_labels(y, fraction, k, seed=4)
        assert np.any(other.redrawn != noisy.redrawn)


def test_label_noise_in_the_runner_touches_training_labels_only():
    data = mnist1d()
    d = {"name": "mnist1d", "num_train": 1000, "num_test": 500, "seed": 7,
         "label_noise": 0.5}
    (x, y), (xt, yt), _ = load_data(d)
    np.testing.assert_array_equal(np.asarray(yt), data.y_test[:500])
    np.testing.assert_array_equal(np.asarray(xt), data.x_test[:500])
    np.testing.assert_array_equal(np.asarray(x), data.x_train[:1000])
    expected = randomize_labels(data.y_train[:1000], 0.5, 10, seed=7).labels
    np.testing.assert_array_equal(np.asarray(y), expected)
    assert np.mean(np.asarray(y) != data.y_train[:1000]) > 0.35


def test_bad_label_noise_l2_and_record_tables_are_config_errors():
    for override, word in [("data.label_noise=1.5", "label_noise"),
                           ("train.l2=-1.0", "train.l2"),
                           ("record.every=15", "multiple"),
                           ('record.measures=["hessian"]', "record.measures"),
                           ("record.probes=0", "record.probes")]:
        with pytest.raises(cfglib.ConfigError, match=word):
            cfglib.load(TINY, [override])
    with pytest.raises(ValueError, match="fraction"):
        randomize_labels(np.zeros(5, np.int32), 2.0, 3)


# ----------------------------------------------- one run against a plain loop ---

@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """Two L2 values vmapped in one group (plus a diverging learning rate), label noise
    and every curvature record on."""
    compiled = []

    def listen(event, secs, fun_name="", **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        res = experiments.run(TINY, out=tmp_path_factory.mktemp("rec") / "r", overrides=[
            "sweep.batch_size=[16]", "sweep.learning_rate=[0.05, 1000.0]",
            "sweep.seed=[1]", f"sweep.train.l2=[0.0, {L2}]", "data.label_noise=0.2",
            "record.every=20", f"record.measures={RECORDED!r}".replace("'", '"'),
            "record.num_examples=128", "record.chunk_size=64", "record.lanczos_steps=30",
            "record.probes=4", "record.index_steps=80",
            'measure.measures=["lambda_max"]'])
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    res.compiled = compiled
    return res


@functools.lru_cache(maxsize=2)
def _plain_loop(model_cfg, l2):
    """The member (batch 16, lr 0.05, seed 1) trained by hand with optax.sgd on the
    data loss plus ½·l2·‖θ‖²; returns the parameters at every step and the mean data
    loss of each 10-step window."""
    data = mnist1d()
    x = jnp.asarray(data.x_train[:256])
    y = jnp.asarray(randomize_labels(data.y_train[:256], 0.2, 10, seed=0).labels)
    model = build_model(json.loads(model_cfg), 40, 10)
    loss_fn = jax.jit(loss_function(model.apply_fn, "cross_entropy"))

    def objective(p, b):
        return loss_fn(p, b) + 0.5 * l2 * sum(jnp.sum(a ** 2) for a in jax.tree.leaves(p))

    step_grad = jax.jit(jax.grad(objective))
    k_init, k_data, _ = jax.random.split(jax.random.key(1), 3)
    params = model.init(k_init)
    opt = optax.sgd(0.05)
    state = opt.init(params)
    trajectory, losses = [params], []
    for t in range(40):
        if t % 16 == 0:
            perm = jax.random.permutation(jax.random.fold_in(k_data, t // 16), 256)
        idx = perm[(t % 16) * 16:(t % 16 + 1) * 16]
        losses.append(float(loss_fn(params, (x[idx], y[idx]))))
        grads = step_grad(params, (x[idx], y[idx]))
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
        trajectory.append(params)
    windows = [np.mean(losses[i:i + 10]) for i in range(0, 40, 10)]
    return model, loss_fn, (x, y), trajectory, windows


def _member(res, lr, l2):
    (rec,) = [r for r in res.records() if r["learning_rate"] == lr and r["train.l2"] == l2]
    return rec


@pytest.mark.parametrize("l2", [0.0, pytest.param(L2, marks=pytest.mark.slow)])
def test_l2_train_loss_and_test_curves_equal_a_plain_loop(recorded, l2):
    rec = _member(recorded, 0.05, l2)
    model, loss_fn, train, traj, windows = _plain_loop(json.dumps(recorded.config["model"]), l2)
    assert rec["status"] == "finished" and rec["steps"] == 40
    # The reported losses are the data loss alone, without the penalty.
    np.testing.assert_allclose(rec["train_loss"], float(loss_fn(traj[40], train)), rtol=1e-4)
    curve = recorded.curves("train_loss")[rec["member"]]
    assert [s for s, _ in curve] == [10, 20, 30, 40]
    np.testing.assert_allclose([v for _, v in curve], windows, rtol=1e-4)
    data = mnist1d()
    xt, yt = jnp.asarray(data.x_test[:128]), jnp.asarray(data.y_test[:128])
    acc = [float(ls.accuracy(model.apply_fn(traj[s], xt), yt)) for s in (10, 20, 30, 40)]
    loss = [float(loss_fn(traj[s], (xt, yt))) for s in (10, 20, 30, 40)]
    test_acc = recorded.curves("test_accuracy")[rec["member"]]
    test_loss = recorded.curves("test_loss")[rec["member"]]
    assert [s for s, _ in test_acc] == [10, 20, 30, 40]
    np.testing.assert_allclose([v for _, v in test_acc], acc, atol=1e-6)
    np.testing.assert_allclose([v for _, v in test_loss], loss, rtol=1e-4)
    best = int(np.argmax(acc))
    assert rec["best_test_accuracy"] == pytest.approx(acc[best], abs=1e-6)
    assert rec["best_test_step"] == (best + 1) * 10


def test_l2_values_share_one_group_and_the_penalty_changes_training(recorded):
    assert len(cfglib.groups(recorded.config)) == 1
    a, b = _member(recorded, 0.05, 0.0), _member(recorded, 0.05, L2)
    assert a["train_loss"] != b["train_loss"]


@pytest.mark.parametrize("l2", [pytest.param(0.0, marks=pytest.mark.slow), L2])
def test_recorded_curvature_equals_the_plain_loop_at_each_record_step(recorded, l2):
    rec = _member(recorded, 0.05, l2)
    model, loss_fn, (x, y), traj, _ = _plain_loop(json.dumps(recorded.config["model"]), l2)
    sub = (x[:128], y[:128])
    flat0, unravel = ravel_pytree(traj[0])
    # References: jax.hessian on the flat parameters (of the data loss, as documented),
    # plain per-layer gradient norms, and per-example gradients by vmap.
    dense = jax.jit(jax.hessian(lambda f: loss_fn(unravel(f), sub)))
    grad = jax.jit(jax.grad(loss_fn))
    per_example = jax.jit(jax.vmap(lambda p, xi, yi: ravel_pytree(
        jax.grad(loss_fn)(p, (xi[None], yi[None])))[0], in_axes=(None, 0, 0)))
    curves = {name: recorded.curves(name)[rec["member"]] for name in (
        "lambda_max", "lambda_min", "index", "noise_scale", "grad_norm/layers/0",
        "grad_norm/layers/1")}
    for name, curve in curves.items():
        assert [s for s, _ in curve] == [0, 20, 40], name
    for j, s in enumerate((0, 20, 40)):
        params = traj[s]
        eigs = np.linalg.eigvalsh(np.asarray(dense(ravel_pytree(params)[0]), np.float64))
        scale = np.abs(eigs).max()
        np.testing.assert_allclose(curves["lambda_max"][j][1], eigs[-1], rtol=2e-2)
        np.testing.assert_allclose(curves["lambda_min"][j][1], eigs[0],
                                   atol=5e-2 * scale)
        index = np.mean(eigs < -1e-3 * scale)
        assert abs(curves["index"][j][1] - index) < 0.06, (s, index)
        grads = grad(params, sub)
        for layer in (0, 1):
            g = grads["layers"][layer]
            norm = np.sqrt(np.sum(np.square(g["kernel"])) + np.sum(np.square(g["bias"])))
            np.testing.assert_allclose(curves[f"grad_norm/layers/{layer}"][j][1], norm,
                                       rtol=1e-4)
        # McCandlish et al.'s B_simple from per-example gradients, written out in numpy.
        g = np.asarray(per_example(params, *sub), np.float64)
        mean = g.mean(0)
        tr_cov = np.sum((g - mean) ** 2) / 127
        b_simple = tr_cov / (mean @ mean - tr_cov / 128)
        np.testing.assert_allclose(curves["noise_scale"][j][1], b_simple, rtol=2e-3)


def test_a_diverged_members_records_stop(recorded):
    for l2 in (0.0, L2):
        rec = _member(recorded, 1000.0, l2)
        assert rec["status"] == "diverged" and rec["steps"] < 10
        for name in ("lambda_max", "index", "noise_scale", "grad_norm/layers/0"):
            assert [s for s, _ in recorded.curves(name)[rec["member"]]] == [0]
        # It diverged inside the first window: no test point, no early-stopping record.
        assert rec["member"] not in recorded.curves("test_accuracy")
        assert math.isnan(rec["best_test_accuracy"])


def test_recording_compiles_the_group_program_once(recorded):
    # Four members, three record steps, the cond and the extra recording pass: one
    # compilation of the group's program (and one of the end-of-run measures).
    assert recorded.compiled.count("jit(group_program)") == 1
    assert len(recorded.curves("lambda_max")[0]) == 3


def test_a_record_interval_off_the_window_grid_is_refused():
    record = RecordSettings(every=15, measures=("lambda_max",), num_examples=8,
                            chunk_size=8, lanczos_steps=4, probes=1, index_steps=4)
    with pytest.raises(ValueError, match="multiple of record_every"):
        Settings(steps=40, batch_size=16, record_every=10, record=record)


@pytest.mark.slow
def test_records_are_the_same_on_eight_simulated_devices(recorded, tmp_path):
    import subprocess
    import sys

    code = ("import experiments, json, jax, sys; assert jax.local_device_count() == 8; "
            f"r = experiments.run(json.loads(sys.argv[1]), out={str(tmp_path / 'd8')!r}); "
            "print(json.dumps({n: r.curves(n) for n in sys.argv[2:]}))")
    names = ["lambda_max", "lambda_min", "index", "noise_scale", "grad_norm/layers/1",
             "test_accuracy", "train_loss"]
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(recorded.config), *names],
                          cwd=Path(__file__).resolve().parents[2], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in names:
        single = recorded.curves(name)
        assert sorted(int(m) for m in sharded[name]) == sorted(single), name
        for m, points in single.items():
            np.testing.assert_allclose(np.array(sharded[name][str(m)]), np.array(points),
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name} {m}")
