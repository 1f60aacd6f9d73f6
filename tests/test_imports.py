"""The direction of imports: experiments -> transforms -> landscape, no cycles.

Each module of the three packages is imported on its own (a fresh copy of the package,
entered through that module), the source is scanned for imports against the direction,
for imports inside functions of Basin's own packages (which would only exist to dodge a
cycle), and for runner modules that import the studies.
"""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("landscape", "transforms", "experiments")
# Only the dispatcher may import the studies; the studies import the runner's pieces.
MAY_IMPORT_STUDIES = {"experiments.run", "experiments.cli"}


def modules() -> list[str]:
    out = []
    for package in PACKAGES:
        out.append(package)
        pkg = importlib.import_module(package)
        out += [m.name for m in pkgutil.walk_packages(pkg.__path__, f"{package}.")]
    return out


def source(name: str) -> ast.Module:
    path = ROOT / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return ast.parse(path.read_text())


def imported(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


@pytest.mark.parametrize("name", modules())
def test_each_module_imports_on_its_own(name):
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in PACKAGES}
    for k in saved:
        del sys.modules[k]
    try:
        importlib.import_module(name)
    finally:
        for k in [k for k in sys.modules if k.split(".")[0] in PACKAGES]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.mark.parametrize("name", modules())
def test_imports_flow_one_way(name):
    top = name.split(".")[0]
    forbidden = {"landscape": ("transforms", "experiments"), "transforms": ("experiments",),
                 "experiments": ()}[top]
    for node in ast.walk(source(name)):
        for target in imported(node):
            assert target.split(".")[0] not in forbidden, f"{name} imports {target}"


@pytest.mark.parametrize("name", modules())
def test_imports_flow_one_way_and_never_hide_in_functions(name):
    tree = source(name)
    top = name.split(".")[0]
    forbidden = {"landscape": ("transforms", "experiments"), "transforms": ("experiments",),
                 "experiments": ()}[top]
    for node in ast.walk(tree):
        for target in imported(node):
            assert target.split(".")[0] not in forbidden, f"{name} imports {target}"
            if target.startswith("experiments.studies") and not name.startswith(
                    "experiments.studies"):
                assert name in MAY_IMPORT_STUDIES, f"{name} imports the studies"
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef))]:
        for node in ast.walk(fn):
            for target in imported(node):
                assert target.split(".")[0] not in PACKAGES, (
                    f"{name}.{fn.name} imports {target} inside a function")


@pytest.mark.parametrize("name", [m for m in modules() if m.startswith("experiments")])
def test_experiments_files_and_functions_stay_small(name):
    """experiments/ keeps files under 400 lines and functions under 60."""
    tree = source(name)
    path = ROOT / Path(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    assert len(path.read_text().splitlines()) <= 400, f"{path} is over 400 lines"
    for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                            ast.AsyncFunctionDef))]:
        length = fn.end_lineno - fn.lineno + 1
        assert length <= 60, f"{name}.{fn.name} is {length} lines"
