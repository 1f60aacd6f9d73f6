"""The documentation is tested like code.

- Every docstring example (`>>>`) in `landscape`, `transforms` and `experiments` runs as a
  doctest, in one shared namespace of the names the examples use (`params`, `loss_fn`,
  `apply_fn`, `x`, `y`, `H`, ... built once per session, as optax's docs tests do). An
  example line with no expected output only has to run; one with output must match it.
  The long ones are marked slow; a few module-level sketches of internal machinery
  (they need a whole group program) are listed in SKETCHES and skipped with the reason.
- The site builds with Sphinx with warnings as errors, and its inventory holds every
  name in the `__all__` of the three packages.
- Every study in `experiments/studies` has a gallery page with its figure and the
  command that reproduces it; the README stays under 200 lines; no paragraph is written
  in two files.

The Python code blocks of README.md and docs/**/*.md run in tests/test_readme.py.
"""

import doctest
import functools
import importlib
import pkgutil
import re
import subprocess
import sys
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
import pytest
from flax import nnx

import experiments
import experiments.studies
import landscape as ls
import landscape.plot
import transforms as tx
from experiments import ArrayData, interrupt
from experiments.models import MLP

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from tests import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("landscape", "transforms", "experiments")

# Docstring examples that take more than a few seconds on a 2-core CPU.
SLOW = {
    "experiments",                       # runs the default study
    "experiments.data.ArrayData",        # experiments.run
    "experiments.run.run",
    "experiments.run.write_report",
    "experiments.run.load",
    "experiments.loop",
    "experiments.models.CNN1D",
    "experiments.models.ResNet1D",
    "experiments.models.Transformer1D",
    "experiments.state.pure",
    "experiments.state.population_statistics",
    "experiments.build",
    "landscape.connectivity.connect",
    "landscape.critical.critical_points",
    "landscape.critical.find_critical_point",
    "landscape.per_block.per_block",
    "landscape.heterogeneity.block_heterogeneity",
    "landscape.operators.hessian",
    "landscape.operators.fisher",
    "landscape.spectrum.eigenvalues",
    "landscape.spectrum.density",
    "landscape.sharding.shard_batch",
    "landscape.sharding.shard",
    "landscape.sharpness.lambda_max",
    "landscape.sharpness.random",
    "landscape.sharpness.keskar",
    "landscape.sharpness.adaptive",
    "landscape.sharpness.pac_bayes",
    "landscape.sharpness.worst_case",
    "landscape.index.hessian_index",
    "landscape.probes.probes_for",
    "transforms.kfac.kfac",
    "transforms.kfac.scale_by_kfac",
    "transforms.shampoo.scale_by_shampoo",
    "transforms.shampoo.shampoo",
    "transforms.soap.soap",
    "transforms.soap.scale_by_soap",
    "transforms.kfac.kfac_statistics",
    "transforms.preconditioner.preconditioned_lambda_max",
    "transforms._adahessian.hutchinson_diagonal",
    "transforms._adahessian.adahessian",
    "transforms.train.train_step",
    "landscape.blocks.restrict",
    "landscape.plot.density",
    "landscape.preconditioned.preconditioned",
    "landscape.noise.minibatch_variance",
    "landscape.sharpness.hessian_trace",
    "landscape.operators.LinearOperator",
    "landscape.memory.chunk_size_for_budget",
    "experiments.models.MLP",
    "transforms.preconditioner.preconditioner",
    "transforms._sophia.sophia_h",
    "transforms._sophia.sophia_g",
    "transforms._sophia.gauss_newton_bartlett",
    "landscape.sharpness.frobenius",
    "landscape.noise.gradient_snr",
    "landscape.trace.diagonal",
}

# Sketches of internal machinery: they show the shape of a call inside the runner and
# need a whole group program (or a run directory) to run.
SKETCHES = {
    "experiments.program": "make_group_program needs a built model and settings",
    "experiments.progress": "shows where the callback goes in make_group_program",
    "experiments.measures": "make_measure_program needs the runner's measuring subsets",
    "experiments.rundir": "prepare() is the runner's; it writes a run directory",
}


def _modules():
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.walk_packages(package.__path__, name + "."):
            yield importlib.import_module(info.name)


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    seen, found = set(), []
    for module in _modules():
        for test in finder.find(module, module.__name__):
            where = (test.filename, test.lineno)
            if test.examples and where not in seen:
                seen.add(where)
                found.append(test)
    return sorted(found, key=lambda t: t.name)


DOCTESTS = _doctests()


# Examples on a (2, 4) mesh: in this process (one CPU device) they are skipped, and
# test_mesh_examples_run_on_eight_devices runs them in a process with 8 host devices.
MESH = {"landscape.memory.device_memory", "landscape.sharding.shard_params",
        "landscape.sharding.shard"}


def _param(test):
    marks = []
    if test.name in MESH and jax.device_count() < 8:
        marks.append(pytest.mark.skip(reason="needs 8 devices; run by "
                                      "test_mesh_examples_run_on_eight_devices"))
    if test.name in SLOW:
        marks.append(pytest.mark.slow)
    if test.name in SKETCHES:
        marks.append(pytest.mark.skip(reason=SKETCHES[test.name]))
    return pytest.param(test, id=test.name, marks=marks)


def _mlp_params(key, sizes=(40, 32, 10)):
    """A plain-JAX MLP with the paths `layers/<i>/kernel|bias` of Basin's NNX MLP."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {"layers": {i: {"kernel": jax.random.normal(k, (a, b)) / jnp.sqrt(a), "bias": jnp.zeros(b)}
                       for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))}}


def _apply(p, inputs):
    h = inputs
    layers = p["layers"]
    for i in range(len(layers)):
        h = h @ layers[i]["kernel"] + layers[i]["bias"]
        if i < len(layers) - 1:
            h = jax.nn.relu(h)
    return h


def _train(params, loss_fn, batch, steps=30, learning_rate=1e-2):
    """Adam steps; returns the parameters after each step and the last optimizer state."""
    opt = optax.adam(learning_rate)

    def step(carry, _):
        p, s = carry
        updates, s = opt.update(jax.grad(loss_fn)(p, batch), s, p)
        p = optax.apply_updates(p, updates)
        return (p, s), p

    (p, s), path = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return p, s, path


@pytest.fixture(scope="session")
def doc_namespace():
    """The names Basin's docstring examples use, built once."""
    key = jax.random.key(0)
    kx, kp, kq, kv = jax.random.split(key, 4)
    x = jax.random.normal(kx, (256, 40))
    y = jax.random.randint(kx, (256,), 0, 10)
    batch = (x, y)
    params = _mlp_params(kp)

    def loss_fn(p, b):
        return ls.cross_entropy(_apply(p, b[0]), b[1])

    def acc_fn(p, b):
        return ls.accuracy(_apply(p, b[0]), b[1])

    def init_fn(k, example_inputs):
        return _mlp_params(k, (example_inputs.shape[-1], 32, 10))

    train = jax.jit(_train, static_argnums=1)                          # one compilation
    trained, opt_state, path = train(params, loss_fn, batch)
    other, _, _ = train(_mlp_params(kq), loss_fn, batch)
    saved_params = jax.tree.map(lambda leaf: leaf[::6], path)          # 5 points along training
    pca = ls.pca_directions(saved_params, k=2)
    surf = ls.surface_2d(loss_fn, pca.origin, pca.directions, batch,
                         xs=jnp.linspace(-1, 1, 5), ys=jnp.linspace(-1, 1, 5))
    grads = jax.grad(loss_fn)(params, batch)
    names = dict(
        functools=functools, jax=jax, jnp=jnp, np=np, optax=optax, nnx=nnx, plt=plt,
        ls=ls, tx=tx, experiments=experiments, ArrayData=ArrayData, interrupt=interrupt,
        plot=landscape.plot, ls_plot=landscape.plot,
        key=key, step=0, learning_rate=1e-2, x=x, y=y, batch=batch, data=batch,
        x_train=x, y_train=y, x_test=x[:64], y_test=y[:64], xt=x[:64], yt=y[:64],
        params=params, params_init=params, params_at_init=params, p0=params,
        params_final=trained, p1=trained, params_a=trained, params_seed0=trained,
        params_b=other, params_seed1=other, saved_params=saved_params,
        checkpoints=[jax.tree.map(lambda leaf, i=i: leaf[i], path) for i in (0, 10, 29)],
        apply_fn=_apply, model_apply=_apply, loss_fn=loss_fn, acc_fn=acc_fn, accuracy_fn=acc_fn,
        init_fn=init_fn,
        f=lambda p: loss_fn(p, batch), grads=grads, g=grads, opt_state=opt_state,
        H=ls.hessian(loss_fn, params, batch), H_later=ls.hessian(loss_fn, trained, batch),
        G=ls.ggn(_apply, params, batch), v=grads, pca=pca, surf=surf,
        model=MLP([40, 32, 10], rngs=nnx.Rngs(0)),
        config={"name": "doc", "train": {"steps": 20, "batch_size": 64}},
        groups=["a", "b"], train=lambda group: None,
        sharp=np.array([1.0, 2.0, 4.0]), test_loss=np.array([0.9, 1.0, 1.2]),
        train_loss=np.array([0.1, 0.1, 0.1]), batch_sizes=np.array([16, 128, 1024]),
    )
    return names


class _RunsOrMatches(doctest.OutputChecker):
    """An example without expected output only has to run; one with output must match."""

    def check_output(self, want, got, optionflags):
        return not want.strip() or super().check_output(want, got, optionflags)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("test", [_param(t) for t in DOCTESTS])
def test_docstring_example_runs(test, doc_namespace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # examples may save figures or runs
    test.globs = {**test.globs, **doc_namespace}
    runner = doctest.DocTestRunner(checker=_RunsOrMatches(), optionflags=(
        doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE))
    report = []
    result = runner.run(test, out=report.append, clear_globs=True)
    assert result.failed == 0, "".join(report)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("slow", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_mesh_examples_run_on_eight_devices(slow):
    names = sorted(n for n in MESH if (n in SLOW) == slow)
    ids = [f"{Path(__file__).relative_to(ROOT)}::test_docstring_example_runs[{n}]" for n in names]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p",
                          "no:cacheprovider", "-m", "slow or not slow", *ids],
                         cwd=ROOT, env=subprocess_env("--xla_force_host_platform_device_count=8"),
                         capture_output=True, text=True, timeout=590)
    assert out.returncode == 0 and f"{len(names)} passed" in out.stdout, out.stdout[-3000:]


def test_every_module_with_examples_is_collected():
    names = {t.name for t in DOCTESTS}
    assert {"landscape.spectrum.eigenvalues", "transforms.registry.make", "experiments.run.run"} <= names
    assert set(SLOW) | set(SKETCHES) | MESH <= names, "a SLOW, SKETCHES or MESH name has no example"


# ---------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    sphinx_build = pytest.importorskip("sphinx.cmd.build")
    out = tmp_path_factory.mktemp("site")
    warnings = out / "warnings.txt"
    code = sphinx_build.build_main(["-b", "html", "-E", "-W", "--keep-going", "-n", "-q",
                                    "-w", str(warnings), str(DOCS), str(out / "html")])
    assert code == 0, warnings.read_text()
    return out / "html"


def _inventory(html):
    raw = (html / "objects.inv").read_bytes()
    body = zlib.decompress(raw.split(b"\n", 4)[4]).decode()
    return {line.split(" ", 1)[0] for line in body.splitlines()}


@pytest.mark.timeout(600)
def test_site_builds_without_warnings_and_documents_every_public_name(built_site):
    documented = _inventory(built_site)
    missing = [f"{package}.{name}" for package in PACKAGES
               for name in importlib.import_module(package).__all__
               if f"{package}.{name}" not in documented]
    assert not missing, f"names in __all__ missing from the API reference: {missing}"
    for page in ("index", "getting_started", "reference/config", "reference/optimizers",
                 "gallery/index", "guides/tour"):
        assert (built_site / f"{page}.html").exists(), page


def _study_names():
    return [m.name for m in sorted(pkgutil.iter_modules(experiments.studies.__path__), key=lambda m: m.name)
            if not m.name.startswith("_")]


@pytest.mark.parametrize("study", _study_names())
def test_every_study_has_a_gallery_page(study):
    page = DOCS / "gallery" / f"{study}.md"
    assert page.exists(), f"docs/gallery/{study}.md is missing"
    text = page.read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert figures, f"{page.name} shows no figure"
    for figure in figures:
        assert (page.parent / figure).exists(), f"{page.name}: {figure} does not exist"
    assert "basin run configs/" in text, f"{page.name} does not say how to reproduce it"


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(((?:docs|configs|experiments)/[^)#]+)\)", text):
        assert (ROOT / target).exists(), target


def _paragraphs(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [" ".join(p.split()) for p in text.split("\n\n") if len(p) > 160
            and not p.lstrip().startswith(("|", "#"))]


def test_no_paragraph_is_written_twice():
    files = [ROOT / "README.md"] + sorted(p for p in DOCS.rglob("*.md")
                                          if "reference" not in p.parts)
    where = {}
    for path in files:
        for paragraph in _paragraphs(path):
            where.setdefault(paragraph, []).append(path.relative_to(ROOT).as_posix())
    repeated = {p[:80]: f for p, f in where.items() if len(f) > 1}
    assert not repeated, repeated
