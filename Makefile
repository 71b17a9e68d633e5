# deferred_signals: every target works on a fresh machine with Python >= 3.10.
# `make help` lists them.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST := $(PY) -m pytest
# The example project; BROKER and DATABASE_URL given to make reach it through the environment.
EXAMPLE := example_project

.DEFAULT_GOAL := help
.PHONY: help venv test test-unit docs services demo worker relay runserver bench matrix lint format clean

help:  ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
		{ echo "deferred_signals needs Python >= 3.10 (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint,docs]'
	touch $(STAMP)

venv: $(STAMP)  ## Create .venv with the package, its test tools and the docs builder.

services:  ## Start PostgreSQL, Redis and RabbitMQ on 127.0.0.1 if installed but stopped.
	@bash scripts/services.sh

test: $(STAMP) services  ## The whole suite: unit + SQLite, then PostgreSQL + real workers; coverage; docs.
	rm -f .coverage .coverage.*
	$(PYTEST) --cov --cov-report= --ds=tests.settings
	$(PYTEST) --cov --cov-append --cov-report= --ds=tests.settings_postgres
	$(PY) -m coverage report
	$(MAKE) --no-print-directory docs

test-unit: $(STAMP)  ## Only the fast layers (unit tests and SQLite), no services needed.
	$(PYTEST) --ds=tests.settings

docs: $(STAMP)  ## Build the documentation site (docs/) into site/, warnings as errors.
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

demo: $(STAMP)  ## The example project end to end: a real worker and relay, the broker cut, a replay.
	$(PY) $(EXAMPLE)/manage.py demo

worker: $(STAMP)  ## Start a celery worker on the example's queue, "accounts" (Ctrl-C to stop).
	$(PY) -m celery --workdir $(EXAMPLE) --app example_project worker --queues accounts --loglevel INFO

relay: $(STAMP)  ## Start the example's outbox relay (Ctrl-C to stop).
	$(PY) $(EXAMPLE)/manage.py deferred_signals --verbosity 2 relay

runserver: $(STAMP)  ## Migrate, print the admin's password, serve the example on 127.0.0.1:8000.
	$(PY) $(EXAMPLE)/manage.py migrate --verbosity 0
	$(PY) $(EXAMPLE)/manage.py demo_admin
	$(PY) $(EXAMPLE)/manage.py runserver 127.0.0.1:8000

bench: $(STAMP) services  ## Side-by-side figures against the usual hand-written idioms.
	$(PY) -m benchmarks.run $(BENCH_ARGS)

matrix: $(STAMP) services  ## The suite on every supported Python x Django found here (nox).
	$(PY) -m pip install --quiet nox
	$(PY) -m nox

LINTED := deferred_signals tests benchmarks example_project noxfile.py

lint: $(STAMP)  ## ruff and mypy (strict).
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)
	$(PY) -m mypy

format: $(STAMP)  ## Format the code with ruff.
	$(PY) -m ruff format $(LINTED)
	$(PY) -m ruff check --fix $(LINTED)

clean:  ## Remove the virtualenv, caches and demo state.
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.* htmlcov *.egg-info .demo site
