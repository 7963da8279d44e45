# The single source of truth for install / run / test / lint / bench.  CI calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.toml

.PHONY: install run test test-fast lint bench bench-tus clean

# tus-js-client for tests/test_tus_clients.py, exactly as tests/js/package-lock.json pins it.
JS_DEPS := tests/js/node_modules/.package-lock.json
$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the daemon on 127.0.0.1:8080 with the embedded SeaweedFS store.
run: $(STAMP)
	$(BIN)/python -m proxy -c $(CONFIG)

## The whole test suite, against a real SeaweedFS the tests start on loopback.
test: $(STAMP) $(JS_DEPS)
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP) $(JS_DEPS)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

## Throughput / CPU / RSS figures (not a test): see bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py

## tus figures (1 GiB in one PATCH and in 8 MiB chunks); SIZE=256MiB for a quicker run.
bench-tus: $(STAMP)
	$(BIN)/python bench/tus_bench.py $(if $(SIZE),--size $(SIZE))

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache
