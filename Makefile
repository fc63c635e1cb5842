# Two commands do all the set-up on a fresh machine:
#   make run    the main job on the embedded default (creates .venv on first use)
#   make test   the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedmrg-installed

# Offline-safe defaults: no hub calls (each miss costs 25-50 s of retries), no telemetry.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export MLFLOW_DISABLE_TELEMETRY := true
export TOKENIZERS_PARALLELISM := false

.PHONY: install run test lint bench flower-venv clean

install: $(STAMP)

# torch/torchvision first and pinned: a bare `torch` requirement can pull a multi-GB build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch torchvision -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $@

run: $(STAMP)
	$(BIN)/fedmrg run $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/data_stream.py

# benchmarks/vs_flower.py's own venv: fedmrg + flwr[simulation] (the `flower` extra), never the
# main one. flwr pins ray==2.55.1 and needs older fastapi, packaging, protobuf, rich, starlette,
# typer, uvicorn and virtualenv than constraints.txt: those pins are dropped here, every other
# pin is kept (torch/torchvision first, as in $(STAMP)).
FLOWER_VENV ?= .venv-flower
FLOWER_STAMP := $(FLOWER_VENV)/.fedmrg-flower-installed
FLOWER_UNPINNED := fastapi|packaging|protobuf|ray|rich|starlette|typer|uvicorn|virtualenv

flower-venv: $(FLOWER_STAMP)

$(FLOWER_STAMP): pyproject.toml constraints.txt
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	grep -viE '^($(FLOWER_UNPINNED))==' constraints.txt > $(FLOWER_VENV)/constraints-flower.txt
	$(FLOWER_VENV)/bin/pip install -q torch torchvision -c constraints.txt
	$(FLOWER_VENV)/bin/pip install -q -c $(FLOWER_VENV)/constraints-flower.txt -e '.[flower]'
	touch $@

clean:
	rm -rf $(VENV) $(FLOWER_VENV) data runs mlruns mlartifacts mlflow.db
