# The two set-up commands are `make run` and `make test`; everything else is optional.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint fmt bench soak clean

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

lint: $(STAMP)
	$(BIN)/ruff check smart tests bench
	$(BIN)/ruff format --check smart tests bench
	$(BIN)/mypy smart

fmt: $(STAMP)
	$(BIN)/ruff format smart tests bench
	$(BIN)/ruff check --fix smart tests bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
