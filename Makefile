# One command set, used by developers, the hook and CI alike.
#   make up     set everything up (first run: virtualenv, dependencies, Redis, Cassandra jars) and run Sluice
#   make test   set up the same way and run lint, type checks and the whole test suite on real servers
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
# The one command (sluice/cli.py, installed by `make deps`); `.venv/bin/sluice --help` lists what it does.
SLUICE := $(VENV)/bin/sluice
SYNCED := $(VENV)/.synced-$(shell cat uv.lock pyproject.toml | cksum | cut -d' ' -f1)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: help up test setup deps sdk-node lint format typecheck infra-check pytest containers containers-check container-test loadtest bench chaos down clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@echo "[sluice] installing uv $(UV_VERSION) into $(TOOLS)/ (once)"
	@$(PYTHON) -m venv $(TOOLS)
	@$(TOOLS)/bin/pip install --quiet uv==$(UV_VERSION)

$(SYNCED): pyproject.toml uv.lock | $(UV)
	@echo "[sluice] installing Python dependencies from uv.lock into $(VENV)/"
	@$(UV) sync --frozen --python $(PYTHON)
	@rm -f $(VENV)/.synced-* && touch $@

deps: $(SYNCED) ## install the locked Python dependencies into .venv

setup: deps ## deps, plus redis-server (apt-get if missing) and Cassandra's jars (mvn, once)
	@$(SLUICE) dev fetch

up: setup ## run Redis, Cassandra, the API on 127.0.0.1:8000 and a worker, in the foreground
	@$(SLUICE) dev up

test: setup lint typecheck infra-check containers-check pytest container-test ## lint, type-check, validate infra, every test on real servers, then in containers

lint: deps ## ruff lint and format check
	@echo "[sluice] ruff"
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

format: deps ## apply ruff's formatting and fixes
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

typecheck: deps ## mypy --strict on our packages
	@echo "[sluice] mypy"
	@$(VENV)/bin/mypy

infra-check: deps ## hadolint, compose schema, cfn-lint and checkov, all offline
	@bash infra/validate.sh

pytest: deps sdk-node ## the test suite alone (starts its own Redis and Cassandra on test ports), without the container suite
	@$(VENV)/bin/pytest -m "not containers" $(PYTEST_ARGS)

# Segment's Node SDK for tests/test_sdk_node.py, from npm as package-lock.json pins it; once per lock file.
NODE_SDK := tests/sdk/node
NODE_SDK_STAMP := $(NODE_SDK)/node_modules/.installed-$(shell cat $(NODE_SDK)/package-lock.json 2>/dev/null | cksum | cut -d' ' -f1)
sdk-node: ## the Node analytics SDK the tests send through (npm ci, cached; skipped without node)
	@if ! command -v node >/dev/null; then echo "[sluice] node not found: the Node SDK's tests will skip"; \
	elif [ ! -f $(NODE_SDK_STAMP) ]; then echo "[sluice] installing the Node SDK into $(NODE_SDK)/node_modules (npm ci)"; \
	  npm ci --prefix $(NODE_SDK) --no-audit --no-fund --loglevel=error && touch $(NODE_SDK_STAMP); fi

containers: setup ## a Docker engine, compose v2 and every image compose names (local stand-ins where pulls fail)
	@export SLUICE_T0=$$(date +%s); bash containers/engine.sh engine && { \
	  bash containers/engine.sh compose & compose=$$!; \
	  bash containers/images.sh; images=$$?; \
	  wait $$compose; built=$$?; \
	  [ $$images = 0 ] && [ $$built = 0 ] || { echo "[containers] FAILED (images: $$images, compose: $$built)" >&2; exit 1; }; }

containers-check: deps ## hadolint on the stand-ins' Dockerfiles, compose schema of the ring, HA and test overrides
	@echo "[sluice] containers: hadolint stand-ins, compose schema of the ring, HA and test overrides"
	@$(VENV)/bin/hadolint --failure-threshold info containers/standin/*/Dockerfile
	@$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec compose.ring.yaml compose.ha.yaml tests/containers/compose.test.yaml

container-test: containers ## the container suite, two groups at once: images, compose, SIGTERM, the HA queue; the ring
	@bash tests/containers/run-parallel.sh $(PYTEST_ARGS)

loadtest: setup ## locust at a fixed rate against the running stack (starts one if none); ARGS="--rate 100 --duration 60"
	@$(SLUICE) loadtest $(ARGS)

bench: setup ## find how far the pipeline goes on this machine; writes build/bench/summary.json
	@$(SLUICE) bench $(ARGS)

chaos: setup ## randomized faults under load, then the exactly-once check (10 min); ARGS="--duration 600 --rate 40 --seed N"
	@$(SLUICE) chaos $(ARGS)

down: deps ## stop servers a crashed run left behind
	@$(SLUICE) dev down
	@$(SLUICE) dev down --profile test
	@$(SLUICE) dev down --profile chaos

clean: down ## remove data, caches and the virtualenv
	rm -rf .data build $(VENV) $(TOOLS) .cache
