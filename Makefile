# The single source of truth for install / run / test / lint / bench.  CI calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.toml

.PHONY: install tools run test test-fast lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the daemon on 127.0.0.1:8080 with the embedded SeaweedFS store.
run: $(STAMP)
	$(BIN)/python -m proxy -c $(CONFIG)

## promtool (Debian's prometheus package) for the contrib/ checks in the suite: installed
## when missing and we are root; otherwise those tests skip and say so.  On a machine
## with systemd the package also enables a local Prometheus service; containers and CI
## runners do not start it.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing promtool (apt-get install prometheus)"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
	    || echo "apt-get failed: the promtool checks will be skipped"; \
	  else \
	    echo "promtool missing and not root: the promtool checks will be skipped"; \
	  fi; }

## The whole test suite, against a real SeaweedFS the tests start on loopback.
test: $(STAMP) tools
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy

## Throughput / CPU / RSS figures (not a test): see bench/README.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache
