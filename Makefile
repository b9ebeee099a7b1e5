# Two commands a new user needs: `make test` and `make demo`. Both build .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
# `mlflow models serve` execs uvicorn by name and MLproject commands call `python`,
# so the venv's bin/ must lead PATH for everything we start.
export PATH := $(BIN):$(PATH)
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: venv test demo clean server

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv
	$(BIN)/python -m lightcycle.demo

clean:
	rm -rf $(VENV) mlflow.db optuna.db mlartifacts lightning_logs
