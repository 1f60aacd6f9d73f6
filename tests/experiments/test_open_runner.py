"""Your own model, data and optimizer through `experiments.run`, against plain optax loops.

Each member's per-window mean training loss and end-of-window test loss must equal a
plain optax loop written here (same key streams: initialization, data order), for an
NNX factory, a Linen pair, an Equinox pair and a plain-JAX pair.
"""

import subprocess
import sys

import equinox as eqx
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import experiments
from experiments import config as cfglib

N_TRAIN, N_TEST, FEATURES, CLASSES = 64, 32, 8, 3
STEPS, BATCH, EVERY = 8, 16, 4


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(FEATURES, CLASSES))
    x = rng.normal(size=(N_TRAIN + N_TEST, FEATURES)).astype(np.float32)
    y = np.argmax(x @ w, axis=1).astype(np.int32)
    return experiments.ArrayData(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


class TwoLayer(nnx.Module):
    def __init__(self, rngs):
        self.a = nnx.Linear(FEATURES, 16, rngs=rngs)
        self.b = nnx.Linear(16, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def nnx_pair():
    """The test's own pure view of the NNX factory (nnx.split / nnx.merge)."""
    graphdef, _ = nnx.split(TwoLayer(nnx.Rngs(0)))

    def init_fn(key, x):
        return nnx.split(TwoLayer(nnx.Rngs(key)))[1]

    def apply_fn(state, x):
        return nnx.merge(graphdef, state)(x)

    return init_fn, apply_fn


class LinenNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(CLASSES)(jnp.tanh(linen.Dense(16)(x)))


def linen_pair():
    net = LinenNet()
    return (lambda key, x: net.init(key, x)), net.apply


def equinox_pair():
    def make(key):
        return eqx.nn.MLP(FEATURES, CLASSES, 16, 1, activation=jnp.tanh, key=key)

    static = eqx.partition(make(jax.random.key(0)), eqx.is_array)[1]

    def init_fn(key, x):
        return eqx.partition(make(key), eqx.is_array)[0]

    def apply_fn(params, x):
        return jax.vmap(eqx.combine(params, static))(x)

    return init_fn, apply_fn


def jax_pair():
    def init_fn(key, x):
        k1, k2 = jax.random.split(key)
        return {"w1": 0.3 * jax.random.normal(k1, (x.shape[1], 16)), "b1": jnp.zeros(16),
                "w2": 0.3 * jax.random.normal(k2, (16, CLASSES)), "b2": jnp.zeros(CLASSES)}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return init_fn, apply_fn


def plain_loop(init_fn, apply_fn, data, lr, seed):
    """Windows' mean training loss and test loss of SGD written plainly."""
    def loss_fn(params, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()

    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    k_init, k_data, _ = jax.random.split(jax.random.key(seed), 3)
    params = init_fn(k_init, x[:1])
    opt = optax.sgd(lr)
    state = opt.init(params)
    per_epoch = N_TRAIN // BATCH
    means, tests, window = [], [], []
    for t in range(STEPS):
        epoch, pos = divmod(t, per_epoch)
        if pos == 0:
            perm = jax.random.permutation(jax.random.fold_in(k_data, epoch), N_TRAIN)
        idx = perm[pos * BATCH:(pos + 1) * BATCH]
        loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        window.append(float(loss))
        if (t + 1) % EVERY == 0:
            means.append(np.mean(window))
            window = []
            tests.append(float(loss_fn(params, jnp.asarray(data.x_test),
                                       jnp.asarray(data.y_test))))
    return np.array(means), np.array(tests)


CONFIG = {"name": "own", "optimizer": {"name": "sgd"},
          "train": {"steps": STEPS, "batch_size": BATCH, "record_every": EVERY},
          "measure": {"num_examples": 32, "chunk_size": 32, "lanczos_steps": 4},
          "sweep": {"learning_rate": [0.05, 0.2], "seed": [0, 1]}}


@pytest.mark.parametrize("kind", ["nnx", pytest.param("linen", marks=pytest.mark.slow),
                                  pytest.param("equinox", marks=pytest.mark.slow), "jax"])
def test_own_model_and_arrays_equal_a_plain_optax_loop(kind, arrays, tmp_path):
    spec = {"nnx": lambda rngs: TwoLayer(rngs), "linen": linen_pair(),
            "equinox": equinox_pair(), "jax": jax_pair()}[kind]
    reference = nnx_pair() if kind == "nnx" else spec
    res = experiments.run(CONFIG, model=spec, data=arrays, out=tmp_path / kind)
    records = res.records()
    assert len(records) == 4
    train_curves, test_curves = res.curves("train_loss"), res.curves("test_loss")
    for r in records:
        means, tests = plain_loop(*reference, arrays, r["learning_rate"], r["seed"])
        got = np.array([v for _, v in train_curves[r["member"]]])
        np.testing.assert_allclose(got, means, rtol=2e-5, atol=1e-6)
        got = np.array([v for _, v in test_curves[r["member"]]])
        np.testing.assert_allclose(got, tests, rtol=2e-5, atol=1e-6)
    assert res.config["model"]["name"] == "python" and res.config["data"]["name"] == "arrays"


def test_data_from_npz_digits_and_epochs(arrays, tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays[:4])))
    cfg = {**CONFIG, "data": {"name": "npz", "path": str(path)}, "sweep": {"seed": [0]},
           "model": {"name": "mlp", "hidden": [8]}}
    from_npz = experiments.run(cfg, out=tmp_path / "npz")
    from_arrays = experiments.run({**cfg, "data": {}}, data=arrays, out=tmp_path / "arr",
                                  model=None)
    a, b = from_npz.curves()[0], from_arrays.curves()[0]
    assert a == b  # the same data through two doors trains identically
    epochs = experiments.run({**cfg, "train": {**cfg["train"], "epochs": 3}},
                             out=tmp_path / "ep")
    assert epochs.records()[0]["steps"] == 3 * (N_TRAIN // BATCH)
    dig = experiments.run({"data": {"name": "digits", "num_train": 256, "num_test": 64},
                           "model": {"name": "mlp", "hidden": [16]},
                           "train": {"steps": 20, "batch_size": 32, "record_every": 10},
                           "sweep": {"seed": [0]}}, out=tmp_path / "dig")
    curve = [v for _, v in dig.curves()[0]]
    assert len(curve) == 2 and curve[1] < curve[0] < 2.5  # 10 classes: ln 10 = 2.30


def test_zipped_sweep_gives_each_optimizer_its_own_grid(arrays, tmp_path):
    cfg = {**CONFIG, "sweep": {"seed": [0], "zip": [
        {"optimizer.name": ["sgd", "sgd", "adam"], "learning_rate": [0.05, 0.2, 0.01]}]}}
    resolved = experiments.validate(cfg, arrays=arrays)
    members = cfglib.expand(resolved)
    assert [(m.get("optimizer.name"), m.get("optimizer.learning_rate")) for m in members] \
        == [("sgd", 0.05), ("sgd", 0.2), ("adam", 0.01)]
    assert len(cfglib.groups(resolved)) == 2  # one program per optimizer
    res = experiments.run(cfg, model=jax_pair(), data=arrays, out=tmp_path / "z")
    names = sorted((r["optimizer.name"], r["learning_rate"]) for r in res.records())
    assert names == [("adam", 0.01), ("sgd", 0.05), ("sgd", 0.2)]


def test_regression_with_float_targets(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(80, 5))  # float64, numpy's default, as a user passes them
    y = x @ rng.normal(size=5)
    data = experiments.ArrayData(x[:64], y[:64], x[64:], y[64:])
    cfg = {"train": {"steps": 40, "batch_size": 16, "record_every": 20, "loss": "mse"},
           "model": {"name": "mlp", "hidden": [8]}, "sweep": {"seed": [0]},
           "measure": {"num_examples": 16, "chunk_size": 16, "lanczos_steps": 4}}
    res = experiments.run(cfg, data=data, out=tmp_path / "reg")
    curve = [v for _, v in res.curves()[0]]
    assert curve[1] < curve[0]


@pytest.mark.parametrize("change, message", [
    ({"model": {"name": "python", "factory": "no_such_pkg.mod:f"}}, "cannot import"),
    ({"model": {"name": "python", "factory": "json:no_such"}}, "has no attribute"),
    ({"model": {"name": "python", "factory": "builtins:str"}}, "not an nnx.Module"),
    ({"model": {"name": "python", "factory": "json:dumps"}}, "the factory failed"),
    ({"model": {"name": "python", "factory": "nofactory"}}, "package.module:attribute"),
    ({"optimizer": {"name": "sgd", "momentun": 0.9}}, "momentun"),
    ({"sweep": {"zip": [{"optimizer.name": ["sgd", "adam"], "learning_rate": [0.1]}]}},
     "equal lengths"),
])
def test_bad_input_is_a_one_line_config_error(change, message, arrays, tmp_path):
    cfg = {**CONFIG, **change}
    with pytest.raises(cfglib.ConfigError, match=message):
        experiments.run(cfg, data=arrays, out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing created before the error


@pytest.mark.parametrize("data, message", [
    ((np.zeros((4, 2)), np.zeros(3, np.int32), np.zeros((2, 2)), np.zeros(2, np.int32)),
     "x_train has 4 examples but y_train has 3"),
    ((np.full((4, 2), np.nan), np.zeros(4, np.int32), np.zeros((2, 2)),
      np.zeros(2, np.int32)), "NaN or inf"),
    ((np.zeros((4, 2)), np.array([0, 1, 2, 5]), np.zeros((2, 2)), np.zeros(2, np.int32),
      3), r"labels must be in \[0, 3\)"),
    ((np.zeros((4, 2)), np.array([0, -1, 0, 1]), np.zeros((2, 2)), np.zeros(2, np.int32)),
     "labels must be in"),
])
def test_bad_arrays(data, message, tmp_path):
    with pytest.raises(cfglib.ConfigError, match=message):
        experiments.run({**CONFIG, "train": {"batch_size": 2, "steps": 2}},
                        data=experiments.ArrayData(*data), out=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_factory_from_a_config_file_on_the_cli(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "from flax import nnx\n"
        "def small(rngs, width=8):\n"
        "    return nnx.Sequential(nnx.Linear(40, width, rngs=rngs), nnx.relu,\n"
        "                          nnx.Linear(width, 10, rngs=rngs))\n")
    (tmp_path / "c.toml").write_text(
        'name = "mine"\n[data]\nnum_train = 128\nnum_test = 64\n'
        '[model]\nname = "python"\nfactory = "mymodels:small"\noptions = {width = 4}\n'
        '[train]\nsteps = 4\nbatch_size = 32\nrecord_every = 2\n'
        '[measure]\nnum_examples = 32\nchunk_size = 32\nlanczos_steps = 3\n')
    proc = subprocess.run(timeout=600, args=[sys.executable, "-m", "experiments.cli", "run", "c.toml", "--out",
                           "r", "--no-report"], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin",
                               "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    bad = subprocess.run(timeout=600, args=[sys.executable, "-m", "experiments.cli", "run", "c.toml", "--set",
                          'model.factory="mymodels:nope"', "--out", "r2"], cwd=tmp_path,
                         capture_output=True, text=True,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin",
                              "HOME": str(tmp_path)})
    assert bad.returncode == 2 and "has no attribute" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_float64_model_runs_and_reports(arrays, tmp_path):
    """Under float64 (as the numerical tests and many users run) a plain-JAX model trains
    in float64, matches the plain loop, and its run's report is written from the store
    alone (the arrays are not needed again)."""
    with jax.enable_x64(True):
        res = experiments.run(CONFIG, model=jax_pair(), data=arrays, out=tmp_path / "f64")
        r = res.records()[0]
        means, tests = plain_loop(*jax_pair(), arrays, r["learning_rate"], r["seed"])
        got = np.array([v for _, v in res.curves("train_loss")[r["member"]]])
        np.testing.assert_allclose(got, means, rtol=1e-5)
    report = experiments.write_report(tmp_path / "f64")
    assert "lambda" in report.read_text().lower()
