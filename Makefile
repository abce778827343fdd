# Every target that needs the environment depends on $(STAMP), so a fresh clone needs
# nothing but `make smoke` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install test test-fast smoke bench lint clean services-up services-down peers-venv

$(STAMP): pyproject.toml setup.py pipeline/_jpeg.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## The loader's peers for bench/loader_peers.py (MosaicML streaming, LitData) in .venv-peers: their pins
## conflict with ours (mosaicml-streaming wants numpy<2.2 and, through transformers, huggingface_hub<1),
## so they never enter .venv. .venv-peers holds only them and the few modules they add (installed with
## --no-deps before the project's packages are visible, so pip cannot touch .venv), and a .pth adds
## .venv's site-packages behind them: one torch, numpy and Pillow for every library in the comparison.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed-stamp
PEER_PKGS := mosaicml-streaming==0.13.0 litdata==0.2.76 lightning-utilities==0.15.3 obstore==0.12.1 \
	xxhash==3.8.2 zstd==1.5.7.2 python-snappy==0.7.3 cramjam==2.14.0 brotli==1.2.1 catalogue==2.0.10 \
	transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2
$(PEERS_STAMP): $(STAMP)
	rm -rf $(PEERS)
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --no-deps $(PEER_PKGS)
	main=$$(cd $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && pwd -P); \
	  site=$$($(PEERS)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	  echo "import site; site.addsitedir('$$main')" > $$site/zz_vitscale_main.pth
	$(PEERS)/bin/python -c 'import torch, streaming, litdata, pipeline'
	touch $(PEERS_STAMP)

peers-venv: $(PEERS_STAMP)

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
bench: $(STAMP) $(PEERS_STAMP)
	$(PY) bench/model_step.py
	$(PY) bench/train_step.py
	$(PY) bench/loader.py
	$(PEERS)/bin/python bench/loader_peers.py
	$(PY) bench/metadata.py
	$(PY) bench/mae_step.py
	$(PY) bench/plan_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check confkit model pipeline training orchestration bench tests

clean:
	@if compgen -G '.vitscale/*.pid' > /dev/null; then VITSCALE_STATE_DIR=.vitscale bash infra/local/stop_services.sh; fi
	rm -rf $(VENV) $(PEERS) .vitscale .smoke .pytest_cache .ruff_cache
