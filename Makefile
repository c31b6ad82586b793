# make demo  — run the whole backfill on this machine against local servers it starts and stops
# make test  — install everything, run the quality gates and the whole test suite
# make manifests — render deploy/values.yaml and deploy/examples/ into deploy/rendered/
# make bench — the backfill benchmark (prints a table, writes bench/results/); bench-server: the
#              layer cache server's load test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist), each with its own Postgres and S3 servers; tests are isolated by
# database and bucket prefix, so any number works. 2 matches this machine and CI.
TEST_WORKERS ?= 2
PYTEST := $(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal

.PHONY: install pgbouncer tools demo manifests lint test coverage unit integration bench bench-smoke bench-server clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m devenv.demo

# The Kubernetes manifests of the committed examples (deploy/README.md); yours:
# .venv/bin/python -m deploy.render -f my-values.yaml -o manifests/
manifests: install
	$(BIN)/python -m deploy.render --examples

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# PgBouncer (Debian's package) for the transaction-pooling tests: installed when missing and this
# is root with apt-get, each apt step bounded to 5 minutes; otherwise say how.
pgbouncer:
	@command -v pgbouncer >/dev/null || test -x /usr/sbin/pgbouncer || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
	      apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null; \
	  else echo "make: pgbouncer is missing (apt-get install pgbouncer)" >&2; fi; }

# The tools pip does not install (Debian's prometheus and victoria-metrics packages, the npm
# package s3rver), fetched into .devenv when missing; the tests only look them up.
tools: install
	timeout 900 $(BIN)/python -m devenv.fetch

test: lint pgbouncer tools
	$(PYTEST)

# The whole suite under coverage (subprocesses included), then the per-module report.
coverage: install pgbouncer tools
	rm -rf .devenv/coverage && mkdir -p .devenv/coverage
	$(PYTEST) --cov --cov-report=term

unit: install
	$(PYTEST) tests/unit

integration: install pgbouncer tools
	$(PYTEST) tests/integration

bench: install tools
	$(BIN)/python -m bench

bench-smoke: install tools
	$(BIN)/python -m bench --smoke

bench-server: install
	$(BIN)/python -m bench.server_load

clean:
	rm -rf $(VENV) .devenv .pytest_cache .mypy_cache .ruff_cache
