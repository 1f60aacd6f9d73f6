# Two set-up commands: `make demo` and `make test`. Each creates .venv and installs first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo curvature-demo test test-slow docs bench clean

$(BIN)/python:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Basin needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]'
	touch $@

# The main job: the default study (sharpness against generalization); prints its report.
demo: $(VENV)/.installed
	$(BIN)/basin run --out runs/sharpness_vs_generalization

curvature-demo: $(VENV)/.installed
	$(BIN)/python -m experiments.curvature_demo --out runs/curvature_demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 -m slow

# The site (Sphinx + MyST + furo) into build/docs, offline; any warning or broken reference fails.
$(VENV)/.docs-installed: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[docs]'
	touch $@

docs: $(VENV)/.docs-installed
	$(BIN)/python -m sphinx -b html -E -W --keep-going -n -q docs build/docs
	@echo "open build/docs/index.html"

# Peer tools (PyTorch CPU, PyHessian, loss-landscapes) live in their own environment.
BENCH_VENV ?= .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip -q install torch==2.13.0
	$(BENCH_VENV)/bin/python -m pip -q install -e '.[bench]'
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs *.egg-info
