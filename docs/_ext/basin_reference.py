"""Pages generated at build time from Basin's own tables, so they cannot drift from the
code: the config reference (`experiments.config.reference`, what `basin config
--reference` prints) and the table of every name `tx.make` accepts (`tx.describe`).
Both are written into docs/reference/ (git-ignored) before Sphinx reads the sources, with
a copy of the notebook tour (experiments/notebooks/tour.ipynb) as docs/guides/tour.ipynb."""

from pathlib import Path

import experiments.config
import experiments.studies
import transforms as tx

# The paper behind each optimizer Basin itself registers (optax's own carry theirs).
PAPERS = {
    "adahessian": "Yao et al. 2021, *ADAHESSIAN: an adaptive second order optimizer*",
    "adam": "Kingma & Ba 2015, *Adam*",
    "adamw": "Loshchilov & Hutter 2019, *Decoupled weight decay regularization*",
    "asam": "Kwon et al. 2021, *ASAM: adaptive sharpness-aware minimization*",
    "gsam": "Zhuang et al. 2022, *Surrogate gap guided sharpness-aware minimization*",
    "kfac": "Martens & Grosse 2015, *Optimizing neural networks with Kronecker-factored approximate curvature*",
    "lion": "Chen et al. 2023, *Symbolic discovery of optimization algorithms*",
    "momentum": "Polyak 1964; Sutskever et al. 2013 (Nesterov)",
    "sam": "Foret et al. 2021, *Sharpness-aware minimization*",
    "sgd": "Robbins & Monro 1951",
    "shampoo": "Gupta et al. 2018, *Shampoo*; Anil et al. 2020 (blocking, grafting)",
    "soap": "Vyas et al. 2025, *SOAP: improving and stabilizing Shampoo using Adam*",
    "sophia_g": "Liu et al. 2024, *Sophia* (Gauss-Newton-Bartlett estimator)",
    "sophia_h": "Liu et al. 2024, *Sophia* (Hutchinson estimator)",
}


def _value(v):
    if v is tx.REQUIRED:
        return "required"
    text = repr(v)
    if len(text) > 40 or "<" in text:
        return type(v).__name__
    return f"`{text}`"


def optimizers_page():
    rows = tx.describe()
    lines = ["# Optimizer reference", "",
             "Every name `tx.make(name, **hyper)` accepts, generated from the registry "
             "(`basin list --optimizers` prints the same). Basin's own come first; the "
             "others are optax's and optax.contrib's, built by name with their "
             "signatures' defaults (see optax's documentation for them).", "",
             "## Basin's optimizers", "",
             "| name | paper | hyper-parameters (default) |", "|---|---|---|"]
    for name, source, hyper in rows:
        if source == "basin":
            params = ", ".join(f"`{k}` {_value(v)}" for k, v in hyper.items())
            lines.append(f"| `{name}` | {PAPERS.get(name, '')} | {params} |")
    lines += ["", "## From optax and optax.contrib", "",
              "| name | source | hyper-parameters (default) |", "|---|---|---|"]
    for name, source, hyper in rows:
        if source != "basin":
            params = ", ".join(f"`{k}` {_value(v)}" for k, v in hyper.items())
            lines.append(f"| `{name}` | {source} | {params} |")
    return "\n".join(lines) + "\n"


def write_pages(app):
    out = Path(app.srcdir) / "reference"
    out.mkdir(exist_ok=True)
    pages = {"config.md": experiments.config.reference(experiments.studies.tables()),
             "optimizers.md": optimizers_page()}
    notebook = Path(app.srcdir).parent / "experiments" / "notebooks" / "tour.ipynb"
    targets = {out / name: text for name, text in pages.items()}
    targets[Path(app.srcdir) / "guides" / "tour.ipynb"] = notebook.read_text()
    for path, text in targets.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)


def setup(app):
    app.connect("builder-inited", write_pages)
    return {"parallel_read_safe": True}
