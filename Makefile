# Two entry points for a fresh machine: `make search` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(abspath ../shared/data)
export AUTOPEFT_DATA_DIR ?= $(if $(wildcard $(DATA)/glue),$(DATA),)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: search test lint install clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build shipped on these machines; then everything else
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

search: $(STAMP)
	$(BIN)/autopeft search --task glue/sst2

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) autopeft-runs .pytest_cache .ruff_cache
