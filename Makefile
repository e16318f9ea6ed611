# The platform's commands. `make demo` runs the main job end to end; `make test` runs the tests.
# Every target creates the environment first, so nothing is installed by hand.

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Per-environment settings from .env (dagster dev reads it too). Make creates it on first use
# with a fresh serving token, so nothing is copied by hand; edit it freely (it is git-ignored).
-include .env
export

.env:
	@echo "# Local settings for mlops_assets (made by make; git-ignored). See README: Configuration." > $@
	@echo "MLOPS_API_TOKEN=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(24))')" >> $@
	@echo "made .env with a new MLOPS_API_TOKEN"

export DAGSTER_HOME ?= $(CURDIR)/data/dagster_home
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

DEMO_ROWS ?= 6000
DEMO_SEED ?= 42
TRAINING_PATH := raw_batches raw_dataset validation_report feature_set train_test_split

.PHONY: install test lint typecheck demo pipeline up down bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

test: install lint
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/dg check defs
	$(BIN)/pytest

$(DAGSTER_HOME)/dagster.yaml:
	mkdir -p $(DAGSTER_HOME)
	touch $@

demo: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/mlops-assets simulate data --rows $(DEMO_ROWS) --seed $(DEMO_SEED) --name demo-seed$(DEMO_SEED).csv
	$(BIN)/dagster asset materialize -m mlops_assets.definitions --select '*'
	$(BIN)/mlops-assets status

pipeline: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster asset materialize -m mlops_assets.definitions --select '*'
	$(BIN)/mlops-assets status

up: install $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/dagster dev -w workspace.yaml --host 127.0.0.1 --port 3000

down:
	@echo "nothing long-running to stop yet"

bench: install
	@echo "benchmarks arrive with the serving issue"

clean:
	rm -rf data/
