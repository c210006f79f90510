# One command each, from a clean clone: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo admin test test-services test-matrix conformance bench soak soak-small lint services screenshot docs clean

# -qq: errors only, so `make demo` starts with no pip notices (a machine's pip configuration
# can add warnings of its own to every call).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test,beat,postgres]'
	@touch $(STAMP)

venv: $(STAMP)

## Demo on SQLite + the filesystem broker: starts a worker, sends tasks, prints the table.
demo: venv
	$(PY) scripts/demo.py

## The admin on the demo's data (after `make demo`): superuser admin / admin in the demo's
## SQLite database, then runserver on http://127.0.0.1:8000/admin/ (ADMIN_ADDR=host:port).
ADMIN_ADDR ?= 127.0.0.1:8000
admin: venv
	$(PY) scripts/demo_admin.py $(ADMIN_ADDR)

## The test suite on SQLite + the filesystem broker (no services needed).
test: venv
	$(PY) -m pytest

## The suite against PostgreSQL + RabbitMQ and MariaDB + Redis (services must be up).
test-services: venv
	bash scripts/services.sh
	$(PY) -m pip install -q 'mysqlclient>=2.2'
	FULLDB_STACK=pg-rabbit $(PY) -m pytest
	FULLDB_STACK=maria-redis $(PY) -m pytest

## Other Django/Python versions (Django 4.2 on 3.10, 6.0 on 3.12).
test-matrix:
	bash scripts/matrix.sh

## Celery's own t/integration suite (Celery 5.7.0) against this backend, in a virtualenv of its
## own; fails on any failure but the documented ones (conformance/expected-failures.txt).
conformance:
	bash scripts/services.sh
	bash conformance/conformance.sh

## admin_screenshot.png (shown in the README): demo data, the admin in headless Chromium.
screenshot: venv
	$(PY) scripts/admin_screenshot.py

## Every benchmark, side by side with the peers; writes BENCHMARKS.md (about 10 min).
bench: venv
	bash scripts/services.sh
	FULLDB_BENCH_COMMAND="make bench" $(PY) bench/run.py

## Soak and fault scenarios on PostgreSQL + RabbitMQ and MariaDB + Redis (about 20 min).
## SOAK_ARGS="--only 1,4 --load-tasks 10000" narrows it; soak-small runs the pytest sizes.
soak: venv
	bash scripts/services.sh
	$(PY) -m pip install -q 'mysqlclient>=2.2'
	$(PY) -m soak $(SOAK_ARGS)

soak-small: venv
	bash scripts/services.sh
	$(PY) -m pip install -q 'mysqlclient>=2.2'
	$(PY) -m soak --small $(SOAK_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

services:
	bash scripts/services.sh

## The documentation site (docs/) in docs/_build/html: Sphinx, every warning an error.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -qq -e '.[docs]'
	@touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) testproject/var .pytest_cache .conformance docs/_build
