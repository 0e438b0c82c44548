# Two entry points for a fresh machine: `make search` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(abspath ../shared/data)
export AUTOPEFT_DATA_DIR ?= $(if $(wildcard $(DATA)/glue),$(DATA),)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: search test lint install clean chromium postgres

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

# the browser test (tests/test_ui_browser.py) needs Debian's chromium; it is skipped, with the reason, without it
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed: the browser test will be skipped"

# the worker/load tests start a real PostgreSQL (initdb + pg_ctl); installed via apt when missing and we are root
# (CI), else those tests are skipped with the reason
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
			|| echo "postgresql not installed: the PostgreSQL tests will be skipped"; \
	else echo "no PostgreSQL (and no apt as root): the PostgreSQL tests will be skipped"; fi

test: $(STAMP) chromium postgres
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) autopeft-runs .pytest_cache .ruff_cache
