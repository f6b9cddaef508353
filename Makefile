# Thin wrappers; every target creates or reuses the project virtualenv first.
# `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Every package, direct and transitive, is locked with its hashes in requirements/ (`make lock`):
# cuda.txt (torch's CUDA build, from PyPI) where nvidia-smi finds a GPU, cpu.txt elsewhere.
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
LOCK := requirements/$(if $(HAS_GPU),cuda,cpu).txt
# cpu.txt's torch (+cpu) comes from PyTorch's CPU index, or from pip's find-links where the wheel
# lies on disk (here /opt/wheels: pip would spend ~8 s retrying the unreachable index per package).
TORCH_INDEX ?= $(if $(wildcard $(PIP_FIND_LINKS:%=%/torch-*+cpu-*.whl)),,https://download.pytorch.org/whl/cpu)
UV ?= uv
# settings in requirements/uv.toml; lock.in adds the embedded model's wheel; the ray extra is
# locked with dev (tests run the Ray engine)
LOCK_ARGS = --config-file requirements/uv.toml pyproject.toml requirements/lock.in --extra dev --extra ray $(if $(UPGRADE),--upgrade)
export GX_ANALYTICS_ENABLED := false
# stage commands (python -m stages.X) must find the venv python
export PATH := $(abspath $(BIN)):$(PATH)

help:  ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/cpu.txt requirements/cuda.txt
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 needed)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@echo "installing $(LOCK) ($(if $(HAS_GPU),GPU found: CUDA,no GPU: CPU) build of torch)"
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK) $(if $(HAS_GPU),,$(TORCH_INDEX:%=--extra-index-url %))
	# the project itself, built by the locked setuptools
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	# `dvc plots show` with Vega inlined, so plots render without network
	$(BIN)/python scripts/offline_plots.py
	# the stamp names the lock installed (tests/test_lock.py checks the venv against it)
	echo $(LOCK) > $(STAMP)

install: $(STAMP)  ## Create .venv and install the locked packages (reruns when pyproject.toml or a lock changes)

lock:  ## Regenerate requirements/{cpu,cuda}.txt from pyproject.toml with uv; keeps locked versions unless UPGRADE=1
	$(UV) pip compile $(LOCK_ARGS) --find-links $(or $(TORCH_INDEX:%=%/torch/),$(PIP_FIND_LINKS)) -o requirements/cpu.txt
	$(UV) pip compile $(LOCK_ARGS) -o requirements/cuda.txt

repro: $(STAMP)  ## Compose conf/ into params.yaml (OVERRIDES="...") and run the pipeline (dvc repro)
	$(BIN)/python -m stages.common.compose $(OVERRIDES)
	$(BIN)/dvc repro
	@$(BIN)/python -c "import json; m=json.load(open('reports/metrics.json')); print('metrics:', json.dumps({k: m[k] for k in ('base','tuned','delta')}, indent=1))"

test: $(STAMP)  ## Run all tests, the end-to-end pipeline runs included
	$(BIN)/pytest

lint: $(STAMP)  ## Check the code with ruff (lint rules and formatting; settings in pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test-fast: $(STAMP)  ## Run the tests without the slow end-to-end ones
	$(BIN)/pytest -m "not slow"

params: $(STAMP)  ## Compose conf/ into params.yaml (what dvc exp run does); OVERRIDES="+experiment=gpu_1b ..."
	$(BIN)/python -m stages.common.compose $(OVERRIDES)

plan: $(STAMP)  ## Run the stages up to split, then print train's measured plan (steps, time, memory) without training
	$(BIN)/dvc repro split
	$(BIN)/python -m stages.train --plan

plots: $(STAMP)  ## Render every plot in dvc.yaml to dvc_plots/index.html (works offline)
	@test -f .dvc/plots_offline.html || $(BIN)/python scripts/offline_plots.py
	$(BIN)/dvc plots show

# the focused table: the params that differ between the experiments shown, and every metric
# of reports/summary.json (kept: the columns with no dot or slash, which params and deps have,
# but DVC's own); plain `dvc exp show` lists every param of params.yaml and every dep too
exps: $(STAMP)  ## Compare experiments: changed params and the summary metrics (ARGS="-A" for every commit)
	$(BIN)/dvc exp show --only-changed --drop 'Created|State|Executor|.*/' \
	  --keep '^(?!(Experiment|Created|State|Executor|rev|typ|parent|seed|preset)$$)[^./]+$$' $(ARGS)

# BASELINE reaches the script through the environment (make exports command-line variables),
# never through the shell's parser
regression: $(STAMP)  ## Compare metrics with a baseline (BASELINE=<git rev or experiment>, default HEAD); fails on a regression
	$(BIN)/python scripts/regression.py

serve: $(STAMP)  ## Serve models/merged over an OpenAI-compatible API to its owner (key in SERVE_API_KEY; conf/serve)
	$(BIN)/python scripts/serve.py

reward-model: $(STAMP)  ## Keep an objective=reward run's models/merged as models/reward (dvc add), for GRPO to be rewarded by
	$(BIN)/python scripts/keep_reward_model.py

feedback: $(STAMP)  ## Rated answers of make serve (serve.log_requests) -> a new data version in data/raw/feedback/ (dvc add)
	$(BIN)/python scripts/feedback.py export

bench-train: $(STAMP)  ## Benchmark the train stage against a plain TRL SFTTrainer (tokens/s, MFU)
	$(BIN)/python scripts/bench_train.py

check-switches: $(STAMP)  ## Run every method x objective pair on the configured model; peak memory per stage (ARGS="--pairs lora:cpt")
	$(BIN)/python scripts/check_switches.py $(ARGS)

bench-data: $(STAMP)  ## Benchmark validate -> dedup -> split on 10k and 100k generated records
	$(BIN)/python scripts/bench_data.py

wandb-sync: $(STAMP)  ## Upload the offline W&B runs (needs WANDB_API_KEY in the environment)
	$(BIN)/wandb sync --yes wandb-runs/wandb/

import: $(STAMP)  ## Import a Hub id or Arrow/Parquet folder as data/raw/NAME.jsonl + NAME.source.json (SOURCE= NAME= [ARGS=])
	@test -n "$(SOURCE)" -a -n "$(NAME)" || { echo "usage: make import SOURCE=<hub id or folder> NAME=<name> [ARGS='--split train --config x --revision v1 --limit N']"; exit 1; }
	$(BIN)/python scripts/import_data.py $(SOURCE) --out data/raw/$(NAME).jsonl $(ARGS)

clean-venv:  ## Remove .venv
	rm -rf $(VENV)

.PHONY: help install lock repro test lint test-fast params plan plots exps regression serve check-switches bench-train bench-data wandb-sync import clean-venv
