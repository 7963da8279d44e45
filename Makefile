# The single source of truth for install / run / test / lint / bench.  CI calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.toml

.PHONY: install run test test-fast test-deps check-systemd lint bench bench-tus clean webui webui-check

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

## System packages the tests run for real: nginx (in front of the proxy), systemd-analyze
## (unit checks), promtool (Debian's prometheus package: metrics, rules, dashboard checks)
## and headless Chromium with its driver (the upload page, tests/browser.py).
## Installed with apt when missing and we are root; otherwise the tests that need them say
## so and skip.  On a machine with systemd the prometheus package also enables a local
## Prometheus service; containers and CI runners do not start it.
test-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing:$$missing"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		  apt-get install -y -qq --no-install-recommends $$missing >/dev/null; } \
		|| echo "apt-get failed: tests needing$$missing will skip"; \
	elif [ -n "$$missing" ]; then echo "not installed (tests will skip):$$missing"; fi

## The whole test suite, against a real SeaweedFS the tests start on loopback.
test: $(STAMP) test-deps $(JS_DEPS)
	$(BIN)/python -m pytest -q -p no:cacheprovider

## systemd-analyze verify + security (exposure <= 2.0) on systemd/upload-proxy.service.
check-systemd: $(STAMP) test-deps
	systemd/check-unit.sh systemd/upload-proxy.service $(abspath $(BIN))/upload-proxy 2.0

test-fast: $(STAMP) test-deps $(JS_DEPS)
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

## The browser upload page: webui/ sources -> proxy/webui/static/ (index.html, app.js,
## app.css, LICENSES.txt), after the page's unit tests.  The output is committed, so
## `make run` and `make test` need no Node for it; run this after changing webui/.
webui:
	cd webui && npm ci --ignore-scripts --no-audit --no-fund && npm test && node build.mjs

## Fails when proxy/webui/static/ is not what webui/ builds (stale or edited by hand).
webui-check:
	cd webui && npm ci --ignore-scripts --no-audit --no-fund && node build.mjs --check

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache
