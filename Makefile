# Every target creates .venv on first use and installs the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all docker-test lint ingest demo bench clean

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

## docker-test: the image, containers and the compose stack on a real engine (tests/docker), plus
## the offline Docker and Kubernetes checks; prints the build times, image size and memory peak
docker-test: $(STAMP)
	@docker info >/dev/null 2>&1 || { echo "make docker-test: no Docker engine answers (docker info)" >&2; exit 1; }
	$(BIN)/pytest -q -s tests/docker tests/test_docker.py

## lint: code, the import contracts, the Dockerfile, the compose files (by compose itself, then
## what only we can check) and the Kubernetes manifests (strict schemas); no engine needed
COMPOSE_FILES := -f docker/docker-compose.yml
HOST_NETWORK := $(COMPOSE_FILES) -f docker/docker-compose.host-network.yml
lint: $(STAMP)
	$(BIN)/ruff check ingest tests
	$(BIN)/mypy ingest
	$(BIN)/lint-imports  # the one way down: contracts in setup.cfg
	$(BIN)/hadolint docker/Dockerfile
	cmp .dockerignore docker/Dockerfile.dockerignore  # the classic builder's copy and BuildKit's
	$(BIN)/docker-compose $(COMPOSE_FILES) --profile '*' config --quiet
	$(BIN)/docker-compose $(HOST_NETWORK) --profile '*' config --quiet
	$(BIN)/python -m ingest.ops.check_compose docker/docker-compose.yml
	$(BIN)/python -m ingest.ops.check_compose docker/docker-compose.yml docker/docker-compose.host-network.yml
	$(BIN)/kubernetes-validate --strict --quiet docker/kubernetes/*.yaml

## ingest: the real API from DATASYNC_API_URL / DATASYNC_API_KEY (embedded database unless DATABASE_URL)
ingest: $(STAMP)
	$(BIN)/datasync-ingest run

## demo: a local simulator with 300,000 events, ingested into the embedded database, then verified
demo: $(STAMP)
	$(BIN)/python -m ingest.ops.demo --events 300000

bench: $(STAMP)
	$(BIN)/python -m ingest.ops.bench

## clean: build and tool caches only; a data directory's state (and the embedded database
## with the ingested events) is `datasync-ingest reset`'s to remove
clean:
	rm -rf $(VENV) .bench .pytest_cache .mypy_cache .ruff_cache
