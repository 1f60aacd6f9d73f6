"""The Python examples of README.md and docs/**/*.md run as written (so the documented
API cannot rot). Blocks of one page share a namespace, later blocks continuing earlier
ones; the guides in CHAIN continue the curvature guide's first example (`params`,
`loss_fn`, `H`, ...) in this order, every other page starts afresh."""

import re
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CHAIN = ["guides/curvature.md", "guides/curvature_at_scale.md", "guides/models.md",
         "guides/memory.md", "guides/sharpness.md", "guides/critical_points.md",
         "guides/optimizers.md"]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def run_blocks(paths, namespace):
    for path in paths:
        for code in python_blocks(path):
            exec(compile(code, str(path), "exec"), namespace)


def test_readme_python_blocks_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # the sweep writes runs/readme
    assert python_blocks(README), "the README has no Python example"
    run_blocks([README], {"__name__": "readme"})
    assert "trace" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_guides_python_blocks_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = [DOCS / page for page in CHAIN]
    assert all(python_blocks(p) for p in paths), "a page of CHAIN has no Python block"
    run_blocks(paths, {"__name__": "docs"})
    assert "trace" in capsys.readouterr().out


def _standalone_pages():
    chained = {DOCS / page for page in CHAIN}
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")
                  if p not in chained and python_blocks(p))


@pytest.mark.parametrize("page", _standalone_pages() or [pytest.param(None, marks=pytest.mark.skip(
    reason="every docs page with Python blocks is in CHAIN"))])
def test_other_pages_python_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_blocks([DOCS / page], {"__name__": "docs"})
