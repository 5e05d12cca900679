# Front door. Every target installs what it needs first and nothing that is already there.
# Quiet by default: V=1 shows what is hidden (pip's and go's messages, every node test by name, apt-get's output).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TWIN := reference/quantlab
NODE_TEST_FLAGS ?= --test-concurrency=2
PYTEST_FLAGS ?= -n auto
VERBOSE := $(filter 1 yes true,$(V))
Q := $(if $(VERBOSE),,@)  # hides a recipe line whose own progress line says what it does
# setuptools' banner about editable installs is a warning for its own developers, not for ours.
PIP_INSTALL := $(if $(VERBOSE),,PYTHONWARNINGS="ignore:Editable installation") $(PY) -m pip install \
  --disable-pip-version-check $(if $(VERBOSE),,--quiet)
# One character a test, every failure in full and the totals (tools/node-test-terse.mjs); V=1: TAP, every test.
NODE_TEST_REPORTERS := --test-reporter=$(if $(VERBOSE),tap,$(CURDIR)/tools/node-test-terse.mjs)
# go's `go: downloading MODULE` lines (one a module on a fresh machine) say nothing a user acts on.
WITHOUT_GO_DOWNLOADS := $(if $(VERBOSE),,2> >(sed -u '/^go: downloading /d' >&2))

.PHONY: help bootstrap venv runtime browser prepare-target lint test test-twin test-harness chaos bench soak clean

help: ## this list
	@awk -F ':.*## ' '/^[a-z][a-z-]*:.*## / { printf "make %-15s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)
	@echo "Add V=1 to any target to see what it hides by default."

bootstrap: runtime .tools/bin/.ready tools/allure/node_modules/.installed ## install what is missing: .venv, the twin's and allure's npm packages, toxiproxy

venv: $(VENV)/.installed ## only the Python environment, .venv (bin/quantlab-canary makes it on first use)

runtime: venv $(TWIN)/node_modules/.installed ## .venv and the twin's npm packages (bin/quantlab-chaos makes them on first use)

tools/allure/node_modules/.installed: tools/allure/package-lock.json
	@command -v npm >/dev/null || { echo "bootstrap: npm not found; install Node.js 20 with npm and run make again" >&2; exit 2; }
	cd tools/allure && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

# Headless Chromium for the test that opens the HTML report; installed with apt where we are root.
browser: ## headless Chromium, with apt-get when it is missing and we are root (for the tests that open HTML reports)
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	      echo "browser: installing Chromium with apt-get (once; a few minutes, most of it downloading)"; \
	      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium $(if $(VERBOSE),,>/dev/null)) || \
	      echo "browser: could not install chromium; the HTML report test will be skipped"; \
	    else echo "browser: chromium missing and not root; the HTML report test will be skipped"; fi; }

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "bootstrap: $(PYTHON) not found; install Python 3.11+ and run make again" >&2; exit 2; }
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || { echo "bootstrap: Python 3.11+ is required ($(PYTHON) is older); set PYTHON=/path/to/python3.11" >&2; exit 2; }
	@echo "bootstrap: making the Python environment .venv (once; about a minute)"
	$(Q)$(PYTHON) -m venv $(VENV)
	$(Q)$(PIP_INSTALL) --upgrade pip
	$(Q)$(PIP_INSTALL) -e '.[chaos,dev]'
	@touch $@

$(TWIN)/node_modules/.installed: $(TWIN)/package-lock.json
	@command -v node >/dev/null || { echo "bootstrap: node not found; install Node.js 20 with npm and run make again" >&2; exit 2; }
	@command -v npm >/dev/null || { echo "bootstrap: npm not found; install Node.js 20 with npm and run make again" >&2; exit 2; }
	cd $(TWIN) && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

.tools/bin/.ready: tools/install-toxiproxy.sh
	$(Q)./tools/install-toxiproxy.sh $(WITHOUT_GO_DOWNLOADS)
	@touch $@

# The real QuantLab snapshot in ../shared/targets/, unpacked and installed outside the project (a no-op when it is
# already prepared, skipped when absent); tests/test_real_target.py runs the chaos suite on it.
prepare-target: ## unpack the real QuantLab snapshot (../shared/targets/) into ~/.cache/quantlab-chaos and npm ci it
	$(PYTHON) tools/prepare_target.py

lint: venv ## ruff and mypy --strict on the code, tests and benchmarks, as configured in pyproject.toml
	$(Q)$(VENV)/bin/ruff check $(if $(VERBOSE),,--quiet)
	$(Q)$(VENV)/bin/mypy $(if $(VERBOSE),,--no-error-summary)
	@echo "lint: ruff and mypy --strict: clean"

test: bootstrap browser lint test-twin test-harness ## ruff and mypy, the twin's node tests, then pytest (about 8 min)

chaos: bootstrap ## the chaos suite against the twin; reports in reports/ (CHAOS_FLAGS: more `run` options)
	$(VENV)/bin/quantlab-chaos run --html $(CHAOS_FLAGS)

test-twin: bootstrap ## the twin's own node --test suite
	cd $(TWIN) && QUANTLAB_TEST_PYTHON=$(CURDIR)/$(PY) node --test $(NODE_TEST_REPORTERS) $(NODE_TEST_FLAGS) test/

# The canary's wheels, for the test that installs it alone into a fresh virtualenv (pytest runs without a network).
.tools/wheelhouse/.ready: pyproject.toml tools/canary_wheelhouse.py
	$(Q)$(PY) tools/canary_wheelhouse.py .tools/wheelhouse
	@touch $@

# The static binaries of the fakes' container images and of netns-exec (harness/fakes/images.py); no Docker needed.
.tools/images/.ready: $(VENV)/.installed harness/fakes/images.py tools/netns-exec/main.go tools/netns-exec/go.mod
	@echo "images: building the static binaries of the fakes' container images (first run only; about a minute)"
	$(Q)$(PY) -m harness.fakes.images binaries $(if $(VERBOSE),,>/dev/null)
	@touch $@

# tools/docker-engine.sh starts a Docker engine of the run's own where it can (root; apt-get installs docker.io once)
# and stops it afterwards, however pytest ends; without one, the container backends' tests skip with the reason.
# harness.bytecode keeps compiled modules in our cache, never beside the sources, even where PYTHONDONTWRITEBYTECODE
# is set: else every process the tests start compiles the harness again (quantlab-chaos does the same).
test-harness: bootstrap prepare-target .tools/wheelhouse/.ready .tools/images/.ready ## the harness's own tests and the scenarios under pytest, with a Docker engine of their own where one can run (PYTEST_FLAGS: -n auto)
	$(PY) -m harness.bytecode ./tools/docker-engine.sh run -- $(PY) -m pytest $(PYTEST_FLAGS)

clean: ## remove what bootstrap installed, and the reports
	rm -rf $(VENV) .tools $(TWIN)/node_modules tools/allure/node_modules
	cd reports && rm -rf allure-results allure-report bench-suite soak real-target *.json *.xml *.png summary.md soak.md runbook.html

# Benchmarks of every moving part (bench/README.md): the quick parts by default, the whole suite with BENCH_SUITE=1;
# the container backends beside the binaries where tools/docker-engine.sh has a Docker engine.
bench: bootstrap .tools/images/.ready ## the benchmarks, in reports/bench.json (BENCH_SUITE=1: the whole suite too); containers where Docker can run
	./tools/docker-engine.sh run -- $(PY) -m bench.run $(if $(filter 1 yes true,$(BENCH_SUITE)),--suite) --out reports/bench.json $(BENCH_FLAGS)

# The chaos suite SOAK_N times (default 20); fails listing every test whose outcome differed between runs.
# SOAK_PRESSURE=1 keeps one busy loop per core running for the whole soak. Reports: reports/soak.{json,md}.
SOAK_N ?= 20
soak: bootstrap ## the chaos suite SOAK_N times (20); fails on any outcome that differs (SOAK_PRESSURE=1: busy CPUs)
	$(VENV)/bin/quantlab-chaos soak -N $(SOAK_N) $(if $(filter 1 yes true,$(SOAK_PRESSURE)),--cpu-pressure) $(SOAK_FLAGS)
