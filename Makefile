# Set-up on a fresh machine: `make demo` and `make test` create .venv and install what they need.
# TORCH_SPEC pins the CPU build that lies on this disk; users with GPUs override it, e.g.
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PIP = $(VENV)/bin/pip -q --disable-pip-version-check
PY = $(VENV)/bin/python

.PHONY: demo test docs bench lint clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC) 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch" && touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install -e ".[demo]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import lanterna, sklearn" && touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PIP) install -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import lanterna, pytest, tensorboard, optuna" && touch $@ $(VENV)/.demo

$(VENV)/.bench: $(VENV)/.test
	$(PIP) install -e ".[bench]" 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -c "import torch; assert torch.__version__.startswith('$(subst torch==,,$(firstword $(TORCH_SPEC)))')" && touch $@

demo: $(VENV)/.demo
	$(PY) examples/demo.py

test: $(VENV)/.test
	$(VENV)/bin/ruff check src tests bench examples
	$(PY) -m pytest -q tests

docs: $(VENV)/.test
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict   # the site: build/site/index.html

bench: $(VENV)/.bench
	$(PY) bench/run.py

lint: $(VENV)/.test
	$(VENV)/bin/ruff check src tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
