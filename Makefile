# `make help` lists the targets: each public one says what it does in its `## ` comment.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist), each with its own Postgres and S3 servers; tests are isolated by
# database and bucket prefix, so any number works. 2 matches this machine and CI.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

.PHONY: help install pgbouncer tools demo demo-up manifests lint test coverage unit integration bench bench-smoke bench-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

help:  ## list the targets
	@awk -F':.*## ' '/^[a-z][a-z-]*:.*## / {printf "  %-13s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(STAMP)  ## create .venv with the project and its development tools

demo: install  ## run the whole backfill on this machine against local servers (KEEP=1: keep them)
	$(BIN)/python -m devenv.demo $(if $(filter 1 yes true,$(KEEP)),--keep)

demo-up: install  ## start local Postgres and S3, seed, print their environment; stop on Ctrl-C
	$(BIN)/python -m devenv.demo --up

manifests: install  ## render deploy/values.yaml and deploy/examples/ into deploy/rendered/
	$(BIN)/python -m deploy.render --examples

lint: install  ## the quality gates: ruff, ruff format, mypy, import-linter
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# PgBouncer (Debian's package) for the transaction-pooling tests: installed when missing and this
# is root with apt-get, each apt step bounded to 5 minutes; otherwise say how.
pgbouncer:  ## install PgBouncer (apt) for the transaction-pooling tests when missing
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
	      apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null; \
	  else echo "make: pgbouncer is missing (apt-get install pgbouncer)" >&2; fi; }

# The tools pip does not install (Debian's prometheus and victoria-metrics packages, the npm
# package s3rver), fetched into .devenv when missing; the tests only look them up.
tools: install  ## fetch the tools pip does not install (prometheus, victoria-metrics, s3rver)
	timeout 900 $(BIN)/python -m devenv.fetch

test: lint pgbouncer tools  ## the quality gates and the whole test suite
	$(PYTEST)

# The whole suite under coverage (subprocesses included), then the per-module report.
coverage: install pgbouncer tools  ## the whole test suite under coverage, then the report
	rm -rf .devenv/coverage && mkdir -p .devenv/coverage
	$(PYTEST) --cov --cov-report=term

unit: install  ## the unit tests
	$(PYTEST) tests/unit

integration: install pgbouncer tools  ## the integration tests (real Postgres and S3 servers)
	$(PYTEST) tests/integration

bench: install tools  ## the backfill benchmark (prints a table, writes bench/results/)
	$(BIN)/python -m bench

bench-smoke: install tools  ## the benchmark, small and quick
	$(BIN)/python -m bench --smoke

# SOAK_SECS=600: the cache tier's memory soak for 10 minutes (default 60 s).
bench-server: install  ## the layer cache server's load test, its access control's cost, its cache tier's
	$(BIN)/python -m bench.server_load
	$(BIN)/python -m bench.server_auth
	$(BIN)/python -m bench.server_cache --soak-secs $(or $(SOAK_SECS),60)

clean:  ## remove .venv, .devenv and the tools' caches
	rm -rf $(VENV) .devenv .pytest_cache .mypy_cache .ruff_cache
