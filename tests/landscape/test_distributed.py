"""Two processes under `jax.distributed` (localhost, 4 simulated CPU devices each, one
2x4 mesh over all 8) give the λ_max and trace of one process on one device."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import subprocess_env

ROOT = Path(__file__).resolve().parents[2]

WORKER = r"""
import json, sys
pid, port = int(sys.argv[1]), sys.argv[2]
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
if pid >= 0:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import landscape as ls
from tests.landscape import models as m
params = m.mlp_params(jax.random.key(1), sizes=(8, 16, 4))
x = jax.random.normal(jax.random.key(3), (40, 8))
y = jax.random.randint(jax.random.key(4), (40,), 0, 4)
H = ls.hessian(m.ce_loss, params, (x, y), chunk_size=10)
if pid >= 0:
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    H = ls.shard(H, mesh=jax.make_mesh((2, 4), ("data", "model")))
key = jax.random.key(0)
eig = ls.eigenvalues(H, k=2, key=key)
tr = ls.trace(H, key=key, num_probes=12, method="hutchinson")
print(json.dumps({"eig": [float(v) for v in eig.values], "trace": float(tr.value),
                  "mv": int(eig.num_matvecs)}))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_processes_equal_one():
    port = str(_free_port())
    env = subprocess_env("--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i), port], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    one = subprocess.run([sys.executable, "-c", WORKER, "-1", port], cwd=ROOT,
                         capture_output=True, text=True, timeout=800)
    assert one.returncode == 0, one.stderr[-3000:]
    want = json.loads(one.stdout.strip().splitlines()[-1])
    for p in procs:
        out, err = p.communicate(timeout=800)
        assert p.returncode == 0, err[-3000:]
        got = json.loads(out.strip().splitlines()[-1])
        assert got["mv"] == want["mv"]
        np.testing.assert_allclose(got["eig"], want["eig"], rtol=1e-9)
        np.testing.assert_allclose(got["trace"], want["trace"], rtol=1e-9)
