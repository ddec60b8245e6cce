# fusion-serve: `make serve` and `make test` are the two commands a new user needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 3000
BUNDLE ?= artifacts/bundle
export BENTOML_DO_NOT_TRACK := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-dev zoo bundle serve test test-fast bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

zoo: install
	$(BIN)/fusion zoo

$(BUNDLE)/manifest.json: | $(VENV)/.installed
	$(BIN)/fusion build --out $(BUNDLE)

bundle: $(BUNDLE)/manifest.json

serve: $(BUNDLE)/manifest.json
	FUSION_BUNDLE=$(BUNDLE) $(BIN)/python -m bentoml serve service.app:FusionService --host 127.0.0.1 --port $(PORT)

test: install-dev
	$(BIN)/python -m pytest -q

test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not server and not slow and not deploy"

bench: install-dev
	$(BIN)/python -m bench.run

clean:
	rm -rf artifacts .pytest_cache test-artifacts
