# mlcycle: `make demo` and `make test` work from a fresh clone with no other step.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= dev,serve,cluster,tune

.PHONY: demo test bench lint format clean setup

setup: $(STAMP)

# The venv sees site-packages so a torch the user already has is kept, never replaced;
# torch==2.13.0 (the CPU build) is installed only when no torch is importable.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mlcycle demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	@set -e; for f in benchmarks/*.py; do echo "== $$f"; $(PY) $$f --quick; done

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
