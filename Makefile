# The two set-up commands are `make run` and `make test`; everything else is optional.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
LINTED := smart simulator harness tests $(wildcard bench scripts)
CI_STAMP := $(VENV)/.ci-installed

.PHONY: install run test lint fmt bench bench-https bench-profile soak clean licenses check-deploy \
	check-alerts instrumentation-cost test-newest test-unit

install: $(STAMP)

# Re-installs only when a requirements file changed; a missing venv is created.
$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

# Serves /api/smart on 127.0.0.1:8080 against the built-in simulated upstream
# (or against SMART_UPSTREAM_URL when it is set). Ctrl-C stops everything.
run: $(STAMP)
	@bash scripts/run-local.sh

test: $(STAMP)
	$(BIN)/python -m pytest

# The unit layer alone, in seconds: no processes, no sockets but the in-process ones.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# The transport on the newest urllib3 and requests beside the pinned ones: the checks of
# smart/upstream/internals.py and the tests of the upstream layer, in a virtualenv of their own.
NEWEST := .venv-newest
NEWEST_TESTS := tests/unit/test_internals.py tests/unit/test_upstream.py tests/e2e/test_connection_pool.py \
	tests/e2e/test_hedge_clock.py tests/e2e/test_faults.py
test-newest: $(STAMP)
	@test -x $(NEWEST)/bin/python || $(PYTHON) -m venv $(NEWEST)
	$(NEWEST)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(NEWEST)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade urllib3 requests
	@$(NEWEST)/bin/python -c 'import requests, urllib3; print("newest: urllib3", urllib3.__version__, "requests", requests.__version__)'
	$(NEWEST)/bin/python -m pytest -q $(NEWEST_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format $(LINTED)
	$(BIN)/ruff check --fix $(LINTED)

# A leak hunt longer than CI's: mixed traffic with failures, hangs and clients hanging
# up for SOAK_S seconds (10 minutes), then every worker must be back to its baseline.
SOAK_S ?= 600
soak: $(STAMP)
	$(BIN)/python bench/soak.py --duration $(SOAK_S)

# Dockerfile, compose, Prometheus/Grafana provisioning, Kubernetes manifests and the
# runtime dependencies' licences: lint, validate, cross-check (scripts/check-deploy.sh).
check-deploy: $(STAMP)
	@bash scripts/check-deploy.sh

# Rewrites docs/LICENSES.md from a fresh install of requirements.txt; fails (and keeps
# the old file) if a licence is outside the allow-list in scripts/check_licenses.py.
licenses: $(CI_STAMP)
	@mkdir -p docs
	@$(BIN)/python scripts/check_licenses.py > docs/LICENSES.md.tmp \
		|| { rm -f docs/LICENSES.md.tmp; exit 1; }
	@mv docs/LICENSES.md.tmp docs/LICENSES.md
	@echo "wrote docs/LICENSES.md"

# The tools of check-deploy, on top of the dev venv; the same stamp the script uses.
$(CI_STAMP): requirements-ci.txt $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
	@touch $@

# Load benchmark on 127.0.0.1: smart and a naive baseline under wrk beside the ideal
# hedger; results in bench/results/ (docs/PERFORMANCE.md). BENCH_QUICK=1: ~4 minutes.
bench: $(STAMP)
	@bash bench/bench.sh

# HTTPS to the upstream beside plain HTTP, with and without TLS session resumption:
# CPU, handshakes per request, p50/p99 (~3 minutes; bench/results/https.md).
bench-https: $(STAMP)
	@bash bench/bench.sh --https

# Where a request's CPU goes, by library (py-spy on one loaded worker).
bench-profile: $(STAMP)
	@bash bench/bench.sh --profile

# Validates and unit-tests the Prometheus alert rules; installs promtool if needed.
check-alerts:
	@bash scripts/ensure-prometheus.sh
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts_test.yml

# Throughput and p50 with metrics and logs on vs off, then each signal's CPU cost (~40 s).
instrumentation-cost: $(STAMP)
	$(BIN)/python bench/instrumentation_cost.py

clean:
	rm -rf $(VENV) $(NEWEST) .pytest_cache .ruff_cache .mypy_cache
