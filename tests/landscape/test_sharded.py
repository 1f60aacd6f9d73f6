"""Operators over examples sharded across devices give the numbers of one device.

Eight simulated CPU devices need XLA_FLAGS before jax is imported, so that test runs in
a subprocess and compares sharded against unsharded operators inside it (float64).
"""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
import pytest

import landscape as ls
from tests import subprocess_env
from tests.landscape import models as m

ROOT = Path(__file__).resolve().parents[2]
KEY = jax.random.key(0)

EIGHT_DEVICES = r"""
import json, sys, jax, jax.numpy as jnp, numpy as np
from jax.flatten_util import ravel_pytree
jax.config.update("jax_enable_x64", True)
import landscape as ls
from tests.landscape import models as m
assert jax.local_device_count() == 8
params = m.mlp_params(jax.random.key(1), sizes=(5, 8, 3))
key = jax.random.key(0)
out = {}
FULL = sys.argv[1] == "full"   # the light run checks matvecs and values only

def compare(name, single, sharded, spectra=True):
    v = jax.tree.map(jnp.ones_like, params)
    both = (single, sharded)
    mv = jax.jit(lambda op: (ravel_pytree(op.matvec(v))[0], op.value()))
    r = {"matvec": [np.asarray(mv(o)[0]).tolist() for o in both],
         "value": [float(mv(o)[1]) for o in both],
         "all_reduce": "all-reduce" in mv.lower(sharded).compile().as_text()}
    if not FULL:
        out[name] = r
        return
    tr = [ls.trace(o, key=key, num_probes=12) for o in both]
    r["trace"] = [float(t.value) for t in tr]
    r["trace_err"] = [float(t.std_error) for t in tr]
    if spectra:
        r["eig"] = [np.asarray(ls.eigenvalues(o, k=2, key=key, num_steps=20).values).tolist()
                    for o in both]
        den = [ls.density(o, key=key, num_probes=2, num_steps=12, num_points=10) for o in both]
        r["nodes"] = [np.asarray(d.nodes).tolist() for d in den]
        r["weights"] = [np.asarray(d.weights).tolist() for d in den]
    out[name] = r

# 200 examples: 25 per device, chunks of 10 leave a remainder chunk on every device.
batch = m.classification_data(jax.random.key(2), n=200)
data = ls.shard_batch(batch)
shard_sizes = sorted({s.data.shape[0] for s in data[0].addressable_shards})
H1 = ls.hessian(m.ce_loss, params, batch, chunk_size=10)
H8 = ls.hessian(m.ce_loss, params, data, chunk_size=10)
assert H1.shards is None and H8.shards is not None
compare("hessian", H1, H8)

# 203 examples: 8 x 25 on the devices plus 3 computed everywhere, weighted 3/203.
odd = m.classification_data(jax.random.key(3), n=203)
G1 = ls.ggn(m.mlp_apply, params, odd, chunk_size=7)
compare("ggn_uneven", G1, ls.shard(G1), spectra=False)

# A batch the user sharded with jax.make_mesh (explicit axis types by default).
mesh = jax.make_mesh((8,), ("data",))
user = jax.device_put(batch, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
compare("explicit_mesh", ls.hessian(m.ce_loss, params, batch),
        ls.hessian(m.ce_loss, params, user), spectra=False)

try:
    ls.shard_batch(odd)
    out["uneven_error"] = ""
except ValueError as e:
    out["uneven_error"] = str(e)
out["shard_sizes"] = shard_sizes
print(json.dumps(out))
"""


def _eight(mode):
    env = subprocess_env("--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, mode], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1700)  # full mode is slow
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def eight():
    return _eight("light")


def _same_numbers(r):
    assert r["all_reduce"]  # the devices' shares are added across devices
    for name in r.keys() - {"all_reduce"}:
        single, sharded = (np.asarray(x) for x in r[name])
        np.testing.assert_allclose(sharded, single, rtol=1e-9, atol=1e-12, err_msg=name)


def test_eight_devices_give_the_matvecs_and_losses_of_one(eight):
    for case in ("hessian", "ggn_uneven", "explicit_mesh"):
        _same_numbers(eight[case])


@pytest.mark.slow
def test_eight_devices_give_the_spectra_of_one():
    # λ_max, trace (Hutch++) and density with the same key, sharded and not (~35 s CPU).
    full = _eight("full")
    assert {"eig", "nodes", "weights", "trace"} <= full["hessian"].keys()
    for case in ("hessian", "ggn_uneven", "explicit_mesh"):
        _same_numbers(full[case])


def test_shard_batch_splits_evenly_or_says_why_not(eight):
    assert eight["shard_sizes"] == [25]
    assert "203 examples, not a multiple of the 8" in eight["uneven_error"]


def test_sharded_mean_on_one_device_is_exact():
    # The shard_map path with a one-device mesh, without a subprocess: same operator.
    params = m.mlp_params(jax.random.key(1), sizes=(5, 8, 3))
    batch = m.classification_data(jax.random.key(2), n=45)
    # The true Fisher: its sampled targets follow the chunk layout, the same here.
    F = ls.fisher(m.mlp_apply, params, batch, kind="true", key=jax.random.key(5),
                  chunk_size=8)
    F1 = ls.shard(F, devices=jax.devices()[:1])
    assert F1.shards is not None
    v = jax.tree.map(jnp.ones_like, params)
    run = jax.jit(lambda op: (ravel_pytree(op.matvec(v))[0], op.value()))
    for got, want in zip(run(F1), run(F)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_shard_rejects_operators_without_data():
    op = ls.LinearOperator(lambda v: v, jnp.zeros(3))
    with pytest.raises(ValueError, match="curvature operator with a batch"):
        ls.shard(op)
    with pytest.raises(ValueError, match="devices"):
        ls.shard(ls.hessian(m.ce_loss, m.mlp_params(KEY), m.classification_data(KEY)),
                 devices=[])
