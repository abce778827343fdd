# Every target that needs the environment depends on $(STAMP), so a fresh clone needs
# nothing but `make smoke` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test test-fast smoke bench lint clean services-up services-down

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The README's test command: unit + integration (real moto S3, Ray, MLflow, DeepSpeed gloo) + slow.
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## Unit tests only (seconds).
test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

## Single-T4 smoke run (CPU fallback): services, demo data, Ray job, registry, fine-tune.
smoke: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash infra/local/smoke.sh

## Local services for the README's commands: a moto S3 server (bucket s3://vitscale) and a Ray head on
## 127.0.0.1, state in .vitscale/ (or $VITSCALE_HOME). Then, in each shell: source .vitscale/env.sh
services-up: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash infra/local/start_services.sh

## Stop exactly the processes services-up started (by pid).
services-down:
	bash infra/local/stop_services.sh

## Every measured claim in BENCHMARKS.md, each printing a ratio against its named baseline.
bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/train_step.py
	$(PY) bench/loader.py
	$(PY) bench/metadata.py
	$(PY) bench/mae_step.py
	$(PY) bench/plan_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check confkit model pipeline training orchestration bench tests

clean:
	@if compgen -G '.vitscale/*.pid' > /dev/null; then VITSCALE_STATE_DIR=.vitscale bash infra/local/stop_services.sh; fi
	rm -rf $(VENV) .vitscale .smoke .pytest_cache .ruff_cache
