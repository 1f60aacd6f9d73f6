"""`.. basin-api:: PACKAGE`: autodoc for every name in PACKAGE.__all__, grouped by the
module that defines it, so a name added to `__all__` appears in the API reference without
editing a page (tests/test_docs.py checks the built inventory holds every name)."""

import importlib
import inspect
import types

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective


def _kind(obj):
    if isinstance(obj, types.ModuleType):
        return "module"
    if inspect.isclass(obj):
        return "class"
    if callable(obj):
        return "function"
    return "data"


def _home(package, obj):
    """The submodule a public name is defined in (its page section)."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    module = getattr(obj, "__module__", None) or package
    if module.startswith(package):
        return module
    return module.replace("._src.alias", "").replace(".contrib._sophia", ".contrib")


def groups(package):
    """{module name: [(public name, kind)]} in `__all__` order."""
    mod = importlib.import_module(package)
    out = {}
    for name in mod.__all__:
        obj = getattr(mod, name)
        out.setdefault(_home(package, obj), []).append((name, _kind(obj)))
    return out


class BasinAPI(SphinxDirective):
    required_arguments = 1

    def run(self):
        package = self.arguments[0]
        lines = [f".. py:module:: {package}", ""]
        for module, names in groups(package).items():
            if not module.startswith(package):
                title = f"Re-exported from ``{module}``"
                lines += [title, "-" * len(title), ""]
                for name, _ in names:
                    lines += [f".. py:function:: {name}", "",
                              f"   ``{module}.{name}`` under a shorter name; its documentation is"
                              " optax's.", ""]
                continue
            first = importlib.import_module(module).__doc__ or ""
            summary = first.strip().split("\n\n")[0].replace("\n", " ")
            title = f"``{module}``"
            lines += [title, "-" * len(title), "", summary, ""]
            for name, kind in names:
                target = f"{package}.{name}"
                if kind == "module":
                    lines += [f".. automodule:: {target}", "   :members:", "",
                              f".. py:currentmodule:: {package}", ""]
                elif kind == "class":
                    lines += [f".. autoclass:: {target}", "   :members:", "   :undoc-members:", ""]
                elif kind == "function":
                    lines += [f".. autofunction:: {target}", ""]
                else:
                    lines += [f".. autodata:: {target}", "   :no-value:", ""]
        node = nodes.section()
        node.document = self.state.document
        self.state.nested_parse(StringList(lines, source=f"<basin-api {package}>"), self.content_offset, node, match_titles=True)
        return node.children


_DOCTEST = (">>>", "...")


def _escape_bars(line):
    """`|x|` is a norm in Basin's docstrings, not an RST substitution: escape the bars
    outside inline code."""
    parts = line.split("`")
    return "`".join(part if i % 2 else part.replace("|", "\\|") for i, part in enumerate(parts))


def markdown_style(app, what, name, obj, options, lines):
    """Basin's docstrings are written to be read as plain text: a line indented under
    the previous one continues it (`name: text` items, wrapped sentences). RST reads
    such a change of indentation as a new block, so separate the blocks with a blank
    line, leaving doctest and literal blocks as they are."""
    out = []
    literal = False
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if out and stripped and out[-1].strip():
            prev = out[-1]
            prev_indent = len(prev) - len(prev.lstrip())
            in_doctest = prev.lstrip().startswith(_DOCTEST) or stripped.startswith(_DOCTEST)
            if indent != prev_indent and not in_doctest and not literal \
                    and not prev.rstrip().endswith("::") and not prev.lstrip().startswith((".. ", ":")):
                out.append("")
        if stripped.endswith("::"):
            literal = True
        elif stripped and literal and indent == 0:
            literal = False
        out.append(line if stripped.startswith(_DOCTEST) or literal else _escape_bars(line))
    lines[:] = out


def setup(app):
    app.add_directive("basin-api", BasinAPI)
    app.connect("autodoc-process-docstring", markdown_style)
    return {"parallel_read_safe": True}
