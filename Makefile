# Every target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint ingest demo bench clean

$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	rm -rf datasync_ingest.egg-info  # a build leftover: the editable install keeps its metadata in .venv
	touch $(STAMP)

install: $(STAMP)

## test: the fast suite (unit, contract, end-to-end and the quick reliability cases)
test: $(STAMP)
	$(BIN)/pytest -q -m 'not slow'

## test-all: everything, the long reliability cases included
test-all: $(STAMP)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check ingest tests
	$(BIN)/mypy ingest
	$(BIN)/lint-imports  # the one way down: contracts in setup.cfg
	$(BIN)/hadolint docker/Dockerfile
	$(BIN)/python -m ingest.ops.check_compose docker/docker-compose.yml

## ingest: the real API from DATASYNC_API_URL / DATASYNC_API_KEY (embedded database unless DATABASE_URL)
ingest: $(STAMP)
	$(BIN)/datasync-ingest run

## demo: a local simulator with 300,000 events, ingested into the embedded database, then verified
demo: $(STAMP)
	$(BIN)/python -m ingest.ops.demo --events 300000

bench: $(STAMP)
	$(BIN)/python -m ingest.ops.bench

clean:
	rm -rf $(VENV) .datasync .bench .pytest_cache .mypy_cache .ruff_cache
