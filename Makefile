# The two commands of the README: `make run` and `make test`. Both build .venv first, from the
# pinned versions in constraints.txt, and skip that step when nothing it depends on has changed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := hf,export,dev
export MLFLOW_DISABLE_TELEMETRY := true
export ITERATIVE_DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
# dvc.yaml's commands say `python`: the project's interpreter must come first.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: venv run test bench lint lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

run: $(STAMP)
	$(BIN)/dvc repro
	@echo
	@echo "Results:"
	@echo "  data/raw/, data/clean/         parquet shards (ingested; cleaned, deduplicated, anonymised)"
	@echo "  metrics/*.json                 counts per stage and validation results (.venv/bin/dvc metrics show)"
	@echo "  reports/data_docs/index.html   Great Expectations data docs"
	@echo "  models/tokenizer/, data/tokens/ BPE tokenizer; token memmaps + meta.json"
	@echo "  models/model/                  the trained model: $(BIN)/tisslm generate --model models/model --prompt 'def '"
	@echo "  models/checkpoints/step-N/     resumable checkpoints"
	@echo "  metrics/train.json, plots/     val bits/byte vs xz; loss curve (dvc plots show)"
	@echo "  metrics/eval.json              bits/byte, perplexities, gzip/bz2/xz baselines, samples"
	@echo "  models/quantized/, models/export/  int8 models (metrics/quantize.json); Hugging Face and GGUF exports"
	@echo "  metrics/bias.json              pct_stereotype per category (ideal 50)"
	@echo "  models/MODEL_CARD.md, models/DATASHEET.md  model card and datasheet"
	@echo "  metrics/register.json          registry decision: is the new model the champion, and why"
	@echo "  mlflow.db                      MLflow runs and registry: $(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py

lint: $(STAMP)
	$(BIN)/ruff check src stages pipelines tests benchmarks
	$(BIN)/ruff format --check src stages pipelines tests benchmarks

# Rewrite constraints.txt from the current environment (after changing dependencies).
lock: $(STAMP)
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
