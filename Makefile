# Two entry points for a fresh machine: `make search` (the main job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= $(abspath ../shared/data)
export AUTOPEFT_DATA_DIR ?= $(if $(wildcard $(DATA)/glue),$(DATA),)
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1

# The AdapterHub round trip (tests/test_export_adapterhub.py) loads our adapterhub/ export with the real `adapters`
# library, which pins transformers 4.57 while we run 5.x: a side dir, put first on PYTHONPATH by the test, holding
# only adapters + transformers 4.57 + the two libraries whose 4.57-compatible versions differ from .venv's; torch,
# numpy, safetensors and the rest are .venv's (so no second torch: ~140 MB, ~15 s to install).
ADAPTERS_ENV := .venv-adapters
ADAPTERS_STAMP := $(ADAPTERS_ENV)/.installed
ADAPTERS_PINS := "adapters==1.3.*" "transformers==4.57.*" "huggingface_hub>=0.34,<1.0" "tokenizers>=0.22,<=0.23.0"

.PHONY: search test lint install clean chromium postgres adapters-env

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned to the CPU build shipped on these machines; then everything else
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

$(ADAPTERS_STAMP): $(STAMP) Makefile
	rm -rf $(ADAPTERS_ENV)
	$(BIN)/pip install -q --no-deps --target $(ADAPTERS_ENV) $(ADAPTERS_PINS)
	PYTHONPATH=$(ADAPTERS_ENV) $(BIN)/python -c "import adapters, transformers; \
		assert transformers.__version__.startswith('4.57'), transformers.__version__; \
		print('adapters', adapters.__version__, 'transformers', transformers.__version__)"
	touch $(ADAPTERS_STAMP)

adapters-env: $(ADAPTERS_STAMP)

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

test: $(STAMP) chromium postgres adapters-env
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -ra

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(ADAPTERS_ENV) autopeft-runs .pytest_cache .ruff_cache
