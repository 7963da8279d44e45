# The single source of truth for install / run / test / lint / bench.  CI calls `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= config.toml

.PHONY: install lock run test test-fast test-deps check-systemd lint bench bench-quick clean dist \
	check-aarch64 aarch64-deps install-service webui webui-check


# What .venv and the service's venv install: exact versions with the hashes of their
# files, so every machine runs the same code.  daemon.lock is what the daemon needs
# (install-service puts it under /opt); dev.lock is that plus the test and dev tools, at
# the same versions (it is compiled with daemon.lock as constraints).  The daemon relies on
# aiohttp internals (proxy/server.py, proxy/storage/s3/body.py): the lock, not setup.cfg's
# ranges, decides which aiohttp runs.  tests/test_lock.py fails when they and setup.cfg
# disagree; `make lock` fixes that.
LOCK     := requirements/daemon.lock
DEV_LOCK := requirements/dev.lock
# --universal: one lock for every platform and Python >= 3.11 (markers where they differ).
UV_COMPILE = $(BIN)/uv pip compile --universal --python-version 3.11 --generate-hashes \
	--quiet --custom-compile-command "make lock" $(if $(UPGRADE),--upgrade)

# tus-js-client for tests/test_tus_clients.py, exactly as tests/js/package-lock.json pins it.
JS_DEPS := tests/js/node_modules/.package-lock.json
$(JS_DEPS): tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund

# The bench's tus client and its peer (@tus/server + @tus/s3-store), as bench/js/package-lock.json pins them.
BENCH_JS_DEPS := bench/js/node_modules/.package-lock.json
$(BENCH_JS_DEPS): bench/js/package.json bench/js/package-lock.json
	cd bench/js && npm ci --no-audit --no-fund

# --clear: the venv holds exactly what the lock says, nothing left from an older one.
# --no-build-isolation: the editable install is built with the locked setuptools.
$(STAMP): setup.cfg pyproject.toml $(DEV_LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

## Recompile the locks from setup.cfg (and requirements/tools.in), keeping every pinned
## version that still fits; `make lock UPGRADE=1` moves everything to the newest release.
lock: $(STAMP)
	$(call compile_lock,$(LOCK),setup.cfg)
	$(call compile_lock,$(DEV_LOCK),-c $(LOCK) --extra dev setup.cfg requirements/tools.in)

# Compile into a copy (uv keeps the pins it finds in its output file) and replace the lock
# only when it changed, so an unchanged lock does not make the next `make` rebuild .venv.
define compile_lock
	cp $(1) $(1).new
	$(UV_COMPILE) -o $(1).new $(2)
	if cmp -s $(1).new $(1); then rm $(1).new; else mv $(1).new $(1); echo "$(1): updated"; fi
endef

## A wheel and an sdist in dist/ (python -m build, with the locked setuptools and wheel).
dist: $(STAMP)
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .

## Run the daemon on 127.0.0.1:8080 with the embedded SeaweedFS store.
run: $(STAMP)
	$(BIN)/python -m proxy -c $(CONFIG)

## System packages the tests run for real: nginx (in front of the proxy), openssl (the
## nginx tests' self-signed certificate), systemd-analyze (unit checks), promtool
## (Debian's prometheus package: metrics, rules, dashboard checks), python3-venv
## (install-service makes the service's venv with /usr/bin/python3), headless
## Chromium with its driver (the upload page, tests/browser.py) and libfaketime (one
## daemon's clock set ahead in tests/test_scale_out.py's clock-skew tests).
## Installed with apt when missing and we are root; otherwise the tests that need them say
## so and skip.  On a machine with systemd the prometheus package also enables a local
## Prometheus service; containers and CI runners do not start it.
test-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	/usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/bin/chromedriver ] || missing="$$missing chromium-driver"; \
	command -v faketime >/dev/null 2>&1 || missing="$$missing faketime"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing:$$missing"; \
		{ apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive \
		  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null; } \
		|| echo "apt-get failed: tests needing$$missing will skip"; \
	elif [ -n "$$missing" ]; then echo "not installed (tests will skip):$$missing"; fi

## The whole test suite, against a real SeaweedFS the tests start on loopback, on two
## pytest-xdist workers (tests/conftest.py says how modules are spread; TEST_WORKERS=0 runs
## it in one process).
TEST_WORKERS ?= 2
TEST_XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)
test: $(STAMP) test-deps $(JS_DEPS)
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15 $(TEST_XDIST)

## debootstrap and qemu-user-static (+ binfmt-support) for check-aarch64, as test-deps does.
aarch64-deps:
	@missing=""; \
	command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v qemu-aarch64-static >/dev/null 2>&1 || missing="$$missing qemu-user-static"; \
	command -v update-binfmts >/dev/null 2>&1 || [ -x /usr/sbin/update-binfmts ] || missing="$$missing binfmt-support"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get -o DPkg::Lock::Timeout=300 update -qq && DEBIAN_FRONTEND=noninteractive \
		  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

## The lock and the daemon on a Raspberry Pi's arm64 Debian, under qemu-user-static:
## aarch64 wheels for every locked requirement on Python 3.11-3.14, then install-service,
## uploads and a clean stop in a debootstrap'd arm64 root (cached in .cache/aarch64).
## Minutes, not part of `make test`: see README "Proof on aarch64".  Needs root.
check-aarch64: dist aarch64-deps
	PATH="$$PATH:/usr/sbin:/sbin" $(BIN)/python tools/check_aarch64.py $(if $(SUITE),--suite $(SUITE))

## The daemon as a systemd service: user, /opt/upload-proxy/venv from the lock, config with
## a generated token, the unit (see README).  DESTDIR=/tmp/stage writes into a staging root
## only; UNINSTALL=1 removes it again (config and uploaded data stay).
install-service: dist
	$(BIN)/upload-proxy install-service --package dist/upload_proxy-*-py3-none-any.whl \
		$(if $(DESTDIR),--destdir $(abspath $(DESTDIR))) $(if $(UNINSTALL),--uninstall)

## systemd-analyze verify + security (exposure <= 2.0) on systemd/upload-proxy.service.
check-systemd: $(STAMP) test-deps
	systemd/check-unit.sh systemd/upload-proxy.service $(abspath $(BIN))/upload-proxy 2.0

test-fast: $(STAMP) test-deps $(JS_DEPS)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow"

## ruff, ruff format, mypy strict and the layer contracts (.importlinter).
lint: $(STAMP)
	$(BIN)/ruff check proxy tests bench tools
	$(BIN)/ruff format --check proxy tests bench tools
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

## The benchmark (not a test): every row at 1 GiB, one table, the ratios against the
## performance targets, raw figures in bench/results/<UTC time>.json.  BENCH_ARGS adds
## options, e.g. BENCH_ARGS="--repeat 3 --big --compare bench/results/OLD.json".
bench: $(STAMP) $(BENCH_JS_DEPS)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

## The same at 128 MiB per upload (8 x 16 MiB concurrent): a check that every row runs.
bench-quick: $(STAMP) $(BENCH_JS_DEPS)
	$(BIN)/python bench/bench.py --size 128MiB $(BENCH_ARGS)

## The browser upload page: webui/ sources -> proxy/webui/static/ (index.html, app.js,
## app.css, LICENSES.txt), after the page's unit tests.  The output is committed, so
## `make run` and `make test` need no Node for it; run this after changing webui/.
webui:
	cd webui && npm ci --ignore-scripts --no-audit --no-fund && npm test && node build.mjs

## Fails when proxy/webui/static/ is not what webui/ builds (stale or edited by hand).
webui-check:
	cd webui && npm ci --ignore-scripts --no-audit --no-fund && node build.mjs --check

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache build dist
