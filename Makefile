# Front door. Every target installs what it needs first and nothing that is already there.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TWIN := reference/quantlab
NODE_TEST_FLAGS ?= --test-concurrency=2
PYTEST_FLAGS ?= -n auto

.PHONY: bootstrap browser prepare-target test test-twin test-harness chaos clean help

help:
	@echo "make chaos      run the chaos suite against the twin (reports in reports/)"
	@echo "make test       run every test suite (the twin's node tests and pytest)"
	@echo "make bootstrap  install what is missing: .venv, the twin's npm packages, toxiproxy"
	@echo "make prepare-target  unpack the real QuantLab snapshot (../shared/targets/) into ~/.cache/quantlab-chaos and npm ci it"
	@echo "make soak       the chaos suite SOAK_N times (20); fails on any outcome that differs (SOAK_PRESSURE=1: busy CPUs)"

bootstrap: $(VENV)/.installed $(TWIN)/node_modules/.installed .tools/bin/.ready tools/allure/node_modules/.installed

tools/allure/node_modules/.installed: tools/allure/package-lock.json
	@command -v npm >/dev/null || { echo "bootstrap: npm not found; install Node.js 20 with npm and run make again" >&2; exit 2; }
	cd tools/allure && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Headless Chromium for the test that opens the HTML report; installed with apt where we are root.
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	      echo "browser: could not install chromium; the HTML report test will be skipped"; \
	    else echo "browser: chromium missing and not root; the HTML report test will be skipped"; fi; }

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "bootstrap: $(PYTHON) not found; install Python 3.11+ and run make again" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { echo "bootstrap: Python 3.11+ is required ($(PYTHON) is older); set PYTHON=/path/to/python3.11" >&2; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e .
	@touch $@

$(TWIN)/node_modules/.installed: $(TWIN)/package-lock.json
	@command -v node >/dev/null || { echo "bootstrap: node not found; install Node.js 20 with npm and run make again" >&2; exit 2; }
	@command -v npm >/dev/null || { echo "bootstrap: npm not found; install Node.js 20 with npm and run make again" >&2; exit 2; }
	cd $(TWIN) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

.tools/bin/.ready: tools/install-toxiproxy.sh
	./tools/install-toxiproxy.sh
	@touch $@

# The real QuantLab snapshot in ../shared/targets/, unpacked and installed outside the project (a no-op when it is
# already prepared, skipped when absent); tests/test_real_target.py runs the chaos suite on it.
prepare-target:
	$(PYTHON) tools/prepare_target.py

test: bootstrap browser test-twin test-harness

chaos: bootstrap
	$(VENV)/bin/quantlab-chaos run --html $(CHAOS_FLAGS)

test-twin: bootstrap
	cd $(TWIN) && QUANTLAB_TEST_PYTHON=$(CURDIR)/$(PY) node --test $(NODE_TEST_FLAGS) test/

test-harness: bootstrap prepare-target
	$(PY) -m pytest $(PYTEST_FLAGS)

clean:
	rm -rf $(VENV) .tools $(TWIN)/node_modules tools/allure/node_modules
	cd reports && rm -rf allure-results allure-report bench-suite soak real-target *.json *.xml summary.md soak.md

# Benchmarks of every moving part (bench/README.md): the quick parts by default, the whole suite with BENCH_SUITE=1.
.PHONY: bench
bench: bootstrap
	$(PY) -m bench.run $(if $(filter 1 yes true,$(BENCH_SUITE)),--suite) --out reports/bench.json $(BENCH_FLAGS)

# The chaos suite SOAK_N times (default 20); fails listing every test whose outcome differed between runs.
# SOAK_PRESSURE=1 keeps one busy loop per core running for the whole soak. Reports: reports/soak.{json,md}.
SOAK_N ?= 20
.PHONY: soak
soak: bootstrap
	$(VENV)/bin/quantlab-chaos soak -N $(SOAK_N) $(if $(filter 1 yes true,$(SOAK_PRESSURE)),--cpu-pressure) $(SOAK_FLAGS)
