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

## Every measured claim in BENCHMARKS.md, each printing a ratio against its named baseline.
bench: $(STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/train_step.py
	$(PY) bench/loader.py
	$(PY) bench/metadata.py

lint: $(STAMP)
	$(VENV)/bin/ruff check model pipeline training orchestration bench tests

clean:
	rm -rf $(VENV) .smoke .pytest_cache .ruff_cache
