# The single source of truth for install / run / test / lint / bench.  CI calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.toml

.PHONY: install run test test-fast test-deps check-systemd lint bench bench-quick clean

# tus-js-client for tests/test_tus_clients.py, exactly as tests/js/package-lock.json pins it.
JS_DEPS := tests/js/node_modules/.package-lock.json
$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund

# The bench's tus client and its peer (@tus/server + @tus/s3-store), as bench/js/package-lock.json pins them.
BENCH_JS_DEPS := bench/js/node_modules/.package-lock.json
$(BENCH_JS_DEPS): bench/js/package.json bench/js/package-lock.json
	cd bench/js && npm ci --no-audit --no-fund

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## Run the daemon on 127.0.0.1:8080 with the embedded SeaweedFS store.
run: $(STAMP)
	$(BIN)/python -m proxy -c $(CONFIG)

## System packages the tests run for real: nginx (in front of the proxy), openssl (the
## nginx tests' self-signed certificate), systemd-analyze (unit checks) and promtool
## (Debian's prometheus package: metrics, rules, dashboard checks).
## Installed with apt when missing and we are root; otherwise the tests that need them say
## so and skip.  On a machine with systemd the prometheus package also enables a local
## Prometheus service; containers and CI runners do not start it.
test-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
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

## The benchmark (not a test): every row at 1 GiB, one table, the ratios against the
## performance targets, raw figures in bench/results/<UTC time>.json.  BENCH_ARGS adds
## options, e.g. BENCH_ARGS="--repeat 3 --big --compare bench/results/OLD.json".
bench: $(STAMP) $(BENCH_JS_DEPS)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

## The same at 128 MiB per upload (8 x 16 MiB concurrent): a check that every row runs.
bench-quick: $(STAMP) $(BENCH_JS_DEPS)
	$(BIN)/python bench/bench.py --size 128MiB $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache
