# Two commands a new user needs: `make test` and `make demo`. Both build .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# `mlflow models serve` execs uvicorn by name and MLproject commands call `python`,
# so the venv's bin/ must lead PATH for everything we start.
export PATH := $(BIN):$(PATH)
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml bench/requirements.txt | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: venv test demo bench clean server postgres java

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml bench/requirements.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { \
		echo "error: lightcycle needs Python >= 3.11 ($(PYTHON) is $$($(PYTHON) --version 2>&1 | head -1))." \
		     "Run: make test PYTHON=python3.11 (or newer)" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@# The benchmarks' own pins (LitServe), without their dependencies: see bench/requirements.txt.
	$(BIN)/python -m pip install --quiet --no-deps -r bench/requirements.txt
	@# The editable install's metadata lives in .venv; setuptools' copy in src/ is a leftover
	@# that would stand in the checkout (README: nothing outside .venv).
	@rm -rf src/lightcycle.egg-info
	@rm -f $(VENV)/.installed-*
	@touch $@

# PostgreSQL 15 for the tests' postgresql variant: installed only where missing and root.
postgres:
	@scripts/ensure-postgres.sh

# Java 17 for the Spark engine (predict -P engine=spark) and its tests: installed where missing and root.
java:
	@scripts/ensure-java.sh

# Two pytest workers, one xdist group at a time (a module, or modules sharing a session fixture:
# see tests/conftest.py), so module fixtures are built once; the longest groups start first
# (--no-loadscope-reorder keeps conftest's order instead of xdist's "most tests first").
# --durations=30: the slowest setups and tests, for whoever next makes the suite faster.
TEST_WORKERS ?= 2
# No __pycache__ in the checkout: tests/conftest.py fails a session that leaves anything there.
test: export PYTHONDONTWRITEBYTECODE = 1
test: venv postgres java
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder --durations=30 $(PYTEST_ARGS)

# A team-style tracking server: PostgreSQL if installed (persistent, in .mlflow-server/),
# sqlite otherwise; artifacts proxied. HOST=0.0.0.0 PORT=5000 AUTH=1 (basic auth).
server: venv
	$(BIN)/python -m lightcycle.operations.tracking_server --host $(or $(HOST),127.0.0.1) --port $(or $(PORT),5000) \
		$(if $(filter 1 true yes,$(AUTH)),--auth)

demo: venv
	$(BIN)/python -m lightcycle.operations.demo

# The benchmarks that fit in 15 minutes on 2 cores, with short settings, as markdown tables
# (progress on stderr: `make bench > report.md`). Logs and figures land in bench/results/;
# spark.predict needs Java 17 (`make java`) and is reported as failed without it.
bench: venv
	$(BIN)/python -m bench.dashboard

clean:
	rm -rf $(VENV) mlflow.db optuna.db mlruns mlartifacts lightning_logs
