"""The runner end to end on a seconds-long study: numbers, divergence, determinism,
resume after a kill, the same results on 8 simulated devices, and the report."""

import json
import math
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

import experiments
import landscape as ls
from experiments.data import mnist1d
from experiments.report import granulated_kendall, kendall_tau
from experiments.train import build_model, loss_function
from tests import subprocess_env

TINY = str(Path(__file__).with_name("tiny.toml"))
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return experiments.run(TINY, out=tmp_path_factory.mktemp("run") / "a")


def _same(a, b):
    """Equal records, NaN (a diverged member's measures) included."""
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _by_point(records):
    return {(r["batch_size"], r["learning_rate"], r["seed"]): r for r in records}


def test_a_member_equals_a_plain_training_loop(tiny_run):
    # Rebuild one member by hand: same init, same epoch permutations, optax.sgd.
    cfg = tiny_run.config
    rec = _by_point(tiny_run.records())[(16, 0.05, 1)]
    data = mnist1d()
    x, y = jnp.asarray(data.x_train[:256]), jnp.asarray(data.y_train[:256])
    model = build_model(cfg["model"], 40, 10)
    loss_fn = loss_function(model.apply_fn, "cross_entropy")
    k_init, k_data, _ = jax.random.split(jax.random.key(1), 3)
    params = model.init(k_init)
    opt = optax.sgd(0.05)
    state = opt.init(params)
    per_epoch = 256 // 16
    for t in range(40):
        if t % per_epoch == 0:
            perm = jax.random.permutation(jax.random.fold_in(k_data, t // per_epoch), 256)
        idx = perm[(t % per_epoch) * 16:(t % per_epoch + 1) * 16]
        grads = jax.grad(loss_fn)(params, (x[idx], y[idx]))
        updates, state = opt.update(grads, state)
        params = optax.apply_updates(params, updates)
    assert rec["status"] == "finished" and rec["steps"] == 40
    np.testing.assert_allclose(rec["train_loss"], float(loss_fn(params, (x, y))), rtol=1e-4)
    test = (jnp.asarray(data.x_test[:128]), jnp.asarray(data.y_test[:128]))
    np.testing.assert_allclose(rec["test_accuracy"],
                               float(ls.accuracy(model.apply_fn(params, test[0]), test[1])),
                               atol=1e-6)
    hess = ls.hessian(loss_fn, params, (x[:128], y[:128]))
    top = float(np.linalg.eigvalsh(np.asarray(hess.dense(), np.float64))[-1])
    np.testing.assert_allclose(rec["lambda_max"], top, rtol=2e-2)


def test_diverging_members_are_recorded_while_the_rest_finish(tiny_run):
    recs = tiny_run.records()
    diverged = [r for r in recs if r["status"] == "diverged"]
    assert diverged and all(r["learning_rate"] == 1000.0 for r in diverged)
    assert all(math.isnan(r["lambda_max"]) for r in diverged)
    fine = [r for r in recs if r["learning_rate"] == 0.05]
    assert all(r["status"] == "finished" and np.isfinite(r["lambda_max"]) for r in fine)


@pytest.mark.slow
def test_same_config_and_seed_give_identical_numbers(tiny_run, tmp_path):
    again = experiments.run(TINY, out=tmp_path / "b")
    _same(again.records(), tiny_run.records())
    _same(again.curves(), tiny_run.curves())


def test_report_is_written_with_figures(tiny_run):
    out = experiments.write_report(tiny_run.path)
    text = out.read_text()
    assert "Kendall" in text and "| batch_size |" in text
    for name in ("sharpness_vs_gap.png", "heatmaps.png", "training_curves.png"):
        assert (tiny_run.path / name).stat().st_size > 5000


def test_kendall_against_scipy_and_granulated_kendall_by_hand():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    assert kendall_tau(x, y) == pytest.approx(stats.kendalltau(x, y).statistic)
    # Granulated: a measure that tracks the gap along batch size but not along lr.
    recs = []
    for b in (16, 64, 256):
        for lr in (0.1, 0.2, 0.4):
            recs.append({"batch_size": b, "learning_rate": lr, "seed": 0,
                         "m": b + 0.0, "accuracy_gap": b / 100 + (1 if lr == 0.2 else 0)})
    psi, per = granulated_kendall(recs, "m", ["batch_size", "learning_rate"])
    # Along batch size (lr fixed) m and gap rise together: τ = 1 in every group.
    assert per["batch_size"] == pytest.approx(1.0)
    # Along lr (batch fixed) m is constant: τ undefined in each group -> NaN, skipped.
    assert math.isnan(per["learning_rate"]) and psi == pytest.approx(1.0)


def _run_cli(args, **kw):
    env = subprocess_env()
    env.update(kw.pop("env", {}))
    return subprocess.Popen([sys.executable, "-m", "experiments.cli", "run", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_after_a_kill_gives_the_same_store(tiny_run, tmp_path):
    # Four groups so there is something to kill in the middle of.
    sets = ["--set", "sweep.batch_size=[8,16,32,64]", "--no-report"]
    full = experiments.run(TINY, overrides=sets[1:2], out=tmp_path / "full")
    out = tmp_path / "killed"
    proc = _run_cli([TINY, *sets, "--out", str(out)])
    db = out / "results.sqlite"
    deadline = time.time() + 1200  # generous: a loaded machine may take minutes
    while time.time() < deadline and proc.poll() is None:  # kill after the first group
        if db.exists():
            try:
                with sqlite3.connect(db) as c:
                    if c.execute("SELECT count(*) FROM groups").fetchone()[0] >= 1:
                        break
            except sqlite3.Error:
                pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with sqlite3.connect(db) as c:
        stored = c.execute("SELECT count(*) FROM groups").fetchone()[0]
        members = c.execute("SELECT count(*) FROM members").fetchone()[0]
    assert 1 <= stored < 4 and members == 4 * stored  # whole groups only
    resumed = experiments.run(resume=out)
    _same(resumed.records(), full.records())


def test_eight_simulated_devices_give_the_same_numbers(tiny_run, tmp_path):
    code = ("import experiments, json, jax, sys; assert jax.local_device_count() == 8; "
            f"r = experiments.run({TINY!r}, out={str(tmp_path / 'dev8')!r}); "
            "print(json.dumps(r.records()))")
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = _by_point(json.loads(proc.stdout.strip().splitlines()[-1]))
    single = _by_point(tiny_run.records())
    assert sharded.keys() == single.keys()
    for k, r in single.items():
        assert sharded[k]["status"] == r["status"]
        for name in ("train_loss", "test_accuracy", "lambda_max", "trace"):
            np.testing.assert_allclose(sharded[k][name], r[name], rtol=1e-4, atol=1e-6,
                                       err_msg=f"{k} {name}")


def test_every_measure_runs_inside_the_group_program(tmp_path):
    every = ["lambda_max", "trace", "worst_case", "adaptive", "random", "keskar",
             "pac_bayes", "noise_scale"]
    res = experiments.run(TINY, out=tmp_path / "m", overrides=[
        f"measure.measures={json.dumps(every)}", "sweep.batch_size=[16]",
        "sweep.learning_rate=[0.05]", "sweep.seed=[0]"])
    (rec,) = res.records()
    assert all(np.isfinite(rec[m]) for m in every)
    # Away from a minimum the ascent must find a loss increase, and flatness is 1/σ² > 0.
    assert rec["worst_case"] > 0 and rec["adaptive"] > 0 and rec["pac_bayes"] > 0


@pytest.mark.parametrize("name", [pytest.param("shampoo", marks=pytest.mark.slow),
                                  pytest.param("soap", marks=pytest.mark.slow), "kfac"])
def test_second_order_optimizers_train_in_the_runner(tmp_path, name):
    res = experiments.run(TINY, out=tmp_path / name, overrides=[
        f'optimizer.name="{name}"', "sweep.batch_size=[32]", "sweep.learning_rate=[0.01]",
        "sweep.seed=[0]", 'measure.measures=["lambda_max"]'])
    (rec,) = res.records()
    assert rec["status"] == "finished"
    curve = [v for _, v in res.curves()[rec["member"]]]
    assert curve[-1] < curve[0]  # the training loss went down


@pytest.mark.slow
def test_the_default_study_runs_in_full(tmp_path):
    # The main job (`make demo`): every member trained towards near-zero training loss,
    # the four measures stored, and a report written. Minutes on a 2-core CPU.
    res = experiments.run(None, out=tmp_path / "main")
    recs = res.records()
    assert len(recs) == 24 and not any(r["status"] == "diverged" for r in recs)
    assert all(r["train_loss"] < 0.1 and r["train_accuracy"] > 0.99 for r in recs)
    for m in ("lambda_max", "trace", "worst_case", "adaptive"):
        assert all(np.isfinite(r[m]) for r in recs)
    # The large-batch gap: the largest batch ends sharper than the smallest on average.
    by_batch = {b: np.mean([r["lambda_max"] for r in recs if r["batch_size"] == b])
                for b in (16, 1024)}
    assert by_batch[1024] > by_batch[16]
    assert experiments.write_report(res.path).is_file()


@pytest.mark.slow
def test_two_processes_with_jax_distributed_share_the_groups(tiny_run, tmp_path):
    # Two processes on localhost (jax.distributed over CPU): each trains every second
    # group into the same run directory; together they equal the one-process run.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "dist"
    code = ("import sys, jax; jax.distributed.initialize(coordinator_address="
            f"'127.0.0.1:{port}', num_processes=2, process_id=int(sys.argv[1])); "
            "import experiments; "
            f"experiments.run({TINY!r}, out={str(out)!r}); print(jax.process_index())")
    env = subprocess_env()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    with sqlite3.connect(out / "results.sqlite") as c:
        assert c.execute("SELECT count(*) FROM groups").fetchone()[0] == 2
    _same(experiments.Results(out).records(), tiny_run.records())
