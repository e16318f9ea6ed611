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

# DATASET picks the data set: a packaged one (phishing_websites, network_flows) or a spec file;
# it becomes MLOPS_DATASET_SPEC, and its data (landing folder, Dagster home, MLflow store) lives in
# data/<name>/ so data sets do not mix. Unset: MLOPS_DATASET_SPEC from .env, else phishing in data/.
DATASET ?=
ifneq ($(DATASET),)
export MLOPS_DATASET_SPEC := $(DATASET)
DATA_DIR := $(CURDIR)/data/$(basename $(notdir $(DATASET)))
else
DATA_DIR := $(CURDIR)/data
endif

# DATASETS runs several data sets at once (MLOPS_DATASETS, comma-separated, the first the primary):
# the primary's data in DATA_DIR as always, every other one's under DATA_DIR/datasets/<name>/.
DATASETS ?=
ifneq ($(DATASETS),)
export MLOPS_DATASETS := $(DATASETS)
# Each data set's Serve application asks 1.5 logical CPUs (deploy/serve_config.yaml): the local head
# offers 2 per data set, so every application is placed (they share the machine's real cores).
comma := ,
export MLOPS_RAY_NUM_CPUS ?= $(shell echo $$((2 * $(words $(subst $(comma), ,$(DATASETS))))))
endif

# Absolute paths: the Ray head hands its environment to replicas, which run in other folders.
export DAGSTER_HOME ?= $(DATA_DIR)/dagster_home
export MLOPS_DATA_URL ?= $(DATA_DIR)
export MLFLOW_TRACKING_URI ?= sqlite:///$(DATA_DIR)/mlflow/mlflow.db
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)

# The UIs `make up` serves (scripts/platform.sh): the runs of demo and pipeline already link to them
# (Dagster metadata -> MLflow run, MLflow run -> Dagster run), so the links work once they are up.
DAGSTER_PORT ?= 3000
MLFLOW_PORT ?= 5000
demo pipeline up: export DAGSTER_PORT := $(DAGSTER_PORT)
demo pipeline up: export MLFLOW_PORT := $(MLFLOW_PORT)
demo pipeline up: export MLFLOW_UI_URL ?= http://127.0.0.1:$(MLFLOW_PORT)
demo pipeline up: export MLOPS_DAGSTER_UI_URL ?= http://127.0.0.1:$(DAGSTER_PORT)

DEMO_ROWS ?= 6000
DEMO_SEED ?= 42
# The training path: accepted raw batches to a registered (and, when the gate passes, champion)
# model. `mlops-assets ingest` runs first: each landed file becomes a raw_batches partition.
TRAINING_PATH := raw_dataset,validation_report,feature_set,train_test_split,trained_model,model_evaluation,registered_model

.PHONY: install test lint typecheck demo pipeline up down bench clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[dev,s3]'
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

# The shipped instance settings (freshness on), written once: an edited dagster.yaml is kept.
$(DAGSTER_HOME)/dagster.yaml: deploy/local/dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	@if [ -s $@ ] && ! cmp -s $< $@; then echo "keeping $@ (the shipped settings: $<)"; else cp $< $@; fi
	@touch $@

demo: install .env $(DAGSTER_HOME)/dagster.yaml
	mkdir -p $(DATA_DIR)/mlflow
ifeq ($(DATASETS),)
	$(BIN)/mlops-assets simulate data --rows $(DEMO_ROWS) --seed $(DEMO_SEED) --name demo-seed$(DEMO_SEED).csv
	$(BIN)/python -m mlops_assets.tools.ray_cluster up
	$(BIN)/mlops-assets ingest
	$(BIN)/dagster asset materialize -m mlops_assets.definitions -c deploy/run_config/in_process.yaml --select '$(TRAINING_PATH),model_deployment,reference_profile'
	$(BIN)/mlops-assets status
	$(BIN)/python -m mlops_assets.tools.sample_request
else
	set -e; for ds in $$($(BIN)/mlops-assets datasets --names); do \
	  $(BIN)/mlops-assets simulate data --dataset $$ds --rows $(DEMO_ROWS) --seed $(DEMO_SEED) --name demo-seed$(DEMO_SEED).csv; done
	$(BIN)/python -m mlops_assets.tools.ray_cluster up
	set -e; for ds in $$($(BIN)/mlops-assets datasets --names); do \
	  $(BIN)/mlops-assets ingest --dataset $$ds; \
	  $(BIN)/mlops-assets train --dataset $$ds --force -c deploy/run_config/in_process.yaml --select '$(TRAINING_PATH),model_deployment,reference_profile'; \
	  $(BIN)/mlops-assets status --dataset $$ds; \
	  $(BIN)/python -m mlops_assets.tools.sample_request --dataset $$ds; done
	@echo "" && echo "the data sets (name, registered model, endpoint, landing folder):" && $(BIN)/mlops-assets datasets
endif
	@echo ""
	@$(BIN)/python -m bench.report --summary
	@$(BIN)/python -c 'from mlops_assets.settings import load_settings; s = load_settings(); \
	  print(f"Serving stays up: {s.serve_url}/predict (token: MLOPS_API_TOKEN in .env; source it with: set -a; . ./.env; set +a)"); \
	  print(f"Ray dashboard: {s.ray_dashboard_url}   Dagster UI: $(MLOPS_DAGSTER_UI_URL) and MLflow UI: $(MLFLOW_UI_URL) after make up   Stop everything: make down")'

pipeline: install .env $(DAGSTER_HOME)/dagster.yaml
	mkdir -p $(DATA_DIR)/mlflow
	$(BIN)/mlops-assets pipeline -c deploy/run_config/in_process.yaml --select '$(TRAINING_PATH)'

up: install .env $(DAGSTER_HOME)/dagster.yaml
	BIN=$(BIN) scripts/platform.sh up

down:
	BIN=$(BIN) scripts/platform.sh down

# Bounded benchmarks on loopback (serving, pipeline, monitoring); BENCH_ARGS=--quick for the short mode.
# `make bench BENCH_ARGS=--results` also rewrites bench/results/serving.json and bench/RESULTS.md.
bench: install .env $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)

clean:
	find data -mindepth 1 -maxdepth 1 ! -name README.md -exec rm -rf {} +
