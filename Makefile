# fusion-serve: `make serve` and `make test` are the two commands a new user needs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PORT   ?= 3000
# the bundle `make serve` serves: `make serve BUNDLE=dir`, else FUSION_BUNDLE from the environment (the
# service's documented setting), else artifacts/bundle. Only the default one is built when missing: another
# missing directory is more likely a typo than a wish for the default recipe (`make bundle BUNDLE=dir` builds it)
DEFAULT_BUNDLE := artifacts/bundle
BUNDLE ?= $(or $(FUSION_BUNDLE),$(DEFAULT_BUNDLE))
export BENTOML_DO_NOT_TRACK := true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-build install-dev zoo bundle serve test test-fast bench clean chromium wrk postgresql
.PHONY: bench-peers peers-venvs peers-ray peers-kserve peers-fastapi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Three dependency sets (pyproject.toml), one stamp each, so a target installs only what it needs and a
# second run installs nothing: the base set serves a bundle (bentoml, onnxruntime, numpy; no torch),
# [build] adds torch and the offline stack (`fusion zoo/build/...`), [dev] the test tools (with [vision]: timm and
# torchvision for the timm:/torchvision: member sources, and [text]: the hf: source's transformers and tokenizers,
# which tests/test_sources.py and tests/test_byo_image.py use).
# Every set installs the serving packages at the versions the image locks (deploy/requirements.lock.txt, read
# as pip constraints: name==version, hashes dropped): the tests run against what the container ships, and a
# release on PyPI since the lock was made cannot change them (deploy/lock.sh re-locks; the stamps then reinstall).
CONSTRAINTS := $(VENV)/constraints.txt
$(CONSTRAINTS): deploy/requirements.lock.txt | $(BIN)/python
	grep -E '^[A-Za-z0-9_.-]+==' $< | sed 's/ .*//' > $@

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed-build: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[build]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[build,vision,text,dev]"
	touch $@ $(VENV)/.installed-build $(VENV)/.installed

install: $(VENV)/.installed  ## the service alone (serve a bundle)
install-build: $(VENV)/.installed-build  ## + torch and the offline pipeline (build bundles)
install-dev: $(VENV)/.installed-dev  ## + the test tools (what `make test` needs)

zoo: install-build
	$(BIN)/fusion zoo

# building a bundle needs [build]; installed here, in the recipe, so that serving an existing bundle
# (an order-only prerequisite would still be made) never installs torch
$(BUNDLE)/manifest.json:
	@if [ "$(abspath $(BUNDLE))" != "$(abspath $(DEFAULT_BUNDLE))" ] && [ -z "$(filter bundle,$(MAKECMDGOALS))" ]; then \
	  echo "make: expected a bundle at $(BUNDLE) (a directory with manifest.json); got none. Build the default recipe" \
	    "there with 'make bundle BUNDLE=$(BUNDLE)', or your own with '$(BIN)/fusion build --recipe RECIPE --out $(BUNDLE)'" >&2; \
	  exit 2; fi
	$(MAKE) --no-print-directory install-build
	$(BIN)/fusion build --out $(BUNDLE)

bundle: $(BUNDLE)/manifest.json

# `python -m service.serve` is `python -m bentoml serve` plus one line, once /readyz answers 200, with the URL and a curl
serve: $(BUNDLE)/manifest.json | $(VENV)/.installed
	FUSION_BUNDLE=$(BUNDLE) $(BIN)/python -m service.serve service.app:FusionService --host 127.0.0.1 --port $(PORT)

# Chromium for the dashboard's browser test (tests/test_ui.py skips, saying why, without it): installed
# from the distribution's packages when running as root with apt-get; a failure only warns.
chromium:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium (apt-get) for tests/test_ui.py"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
	    || echo "warning: could not install chromium; tests/test_ui.py's browser tests will skip"; \
	else echo "note: no /usr/bin/chromium (apt-get install -y chromium chromium-driver as root); the browser tests will skip"; fi

# wrk (a C load generator, Debian's package) drives the served benchmarks (bench/loadgen.py); without it
# they fall back to a Python client that takes more of the shared cores. Installed like chromium.
wrk:
	@if command -v wrk >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing wrk (apt-get) for the served benchmarks"; \
	  (apt-get install -y -qq wrk || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk)) >/dev/null 2>&1 \
	    || echo "warning: could not install wrk; the served benchmarks use the Python client"; \
	else echo "note: no wrk (apt-get install -y wrk as root); the served benchmarks use the Python client"; fi

# PostgreSQL for the shared A/B store's tests (tests/pg.py runs initdb + pg_ctl in a temporary directory;
# tests/test_abstore*.py skip, saying why, without it): Debian's package, installed like chromium.
postgresql:
	@if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing postgresql (apt-get) for tests/test_abstore*.py"; \
	  (apt-get install -y -qq postgresql || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql)) >/dev/null 2>&1 \
	    || echo "warning: could not install postgresql; the PostgreSQL store tests will skip"; \
	else echo "note: no PostgreSQL binaries (apt-get install -y postgresql as root); the PostgreSQL store tests will skip"; fi

test: install-dev chromium wrk postgresql
	$(BIN)/python -m pytest -q

test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not server and not slow and not deploy"

bench: install-dev wrk $(BUNDLE)/manifest.json  ## every benchmark once -> docs/BENCHMARKS.md (+ benchmarks.json, plots)
	$(BIN)/python -m bench.run --bundle $(BUNDLE)

# ---- peers (issue 18): the same ensembles served by Ray Serve, KServe, FastAPI + torch and plain BentoML, side by
# side with ours -> docs/PEERS.md + docs/peers.png (bench/peers/). Each peer installs into its own venv under
# artifacts/peers/, never into the product's: Ray Serve and KServe with onnxruntime pinned to the product's version;
# the FastAPI one reuses the product venv's torch/timm/transformers through a .pth file (no second torch). A peer
# that cannot install warns and is skipped by the harness, which says why.
PEERS_DIR   := artifacts/peers
ORT_VERSION  = $(shell $(BIN)/python -c "import importlib.metadata as m; print(m.version('onnxruntime'))")
PEER_DEPS    = onnxruntime==$(ORT_VERSION) pillow tokenizers numpy

$(PEERS_DIR)/ray/.installed: | $(VENV)/.installed-dev
	rm -rf $(PEERS_DIR)/ray && $(PYTHON) -m venv $(PEERS_DIR)/ray
	$(PEERS_DIR)/ray/bin/pip install -q "ray[serve]" $(PEER_DEPS) && touch $@ \
	  || echo "warning: Ray Serve did not install; make bench-peers skips it"

$(PEERS_DIR)/kserve/.installed: | $(VENV)/.installed-dev
	rm -rf $(PEERS_DIR)/kserve && $(PYTHON) -m venv $(PEERS_DIR)/kserve
	$(PEERS_DIR)/kserve/bin/pip install -q kserve $(PEER_DEPS) && touch $@ \
	  || echo "warning: KServe did not install; make bench-peers skips it"

$(PEERS_DIR)/fastapi/.installed: | $(VENV)/.installed-dev
	rm -rf $(PEERS_DIR)/fastapi && $(PYTHON) -m venv $(PEERS_DIR)/fastapi
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(PEERS_DIR)/fastapi/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/product-venv.pth"
	$(PEERS_DIR)/fastapi/bin/pip install -q fastapi uvicorn && touch $@ \
	  || echo "warning: FastAPI did not install; make bench-peers skips it"

peers-ray: $(PEERS_DIR)/ray/.installed
peers-kserve: $(PEERS_DIR)/kserve/.installed
peers-fastapi: $(PEERS_DIR)/fastapi/.installed
peers-venvs: peers-ray peers-kserve peers-fastapi  ## the peers' own venvs under artifacts/peers/

bench-peers: install-dev wrk peers-venvs  ## ours vs Ray Serve, KServe, FastAPI, BentoML -> docs/BENCHMARKS.md + docs/PEERS.md
	$(BIN)/python -m bench.peers.harness

clean:
	rm -rf artifacts .pytest_cache test-artifacts

# ---- containers and deployment (deploy/README.md) ------------------------------------------------
# The bento tag (<bundle_version>-<digest>) of the last build is kept in $(CONTAINER)/bento-<flavour>.tag.
CONTAINER := artifacts/container
IMAGE     ?= fusion-serve
IMAGE_GPU ?= fusion-serve-gpu
bento_tag  = $$(cat $(CONTAINER)/bento-$(1).tag)

.PHONY: bento bento-gpu containerfile containerfile-gpu container-context smoke-container image image-gpu k8s-render test-deploy

bento: $(BUNDLE)/manifest.json | $(VENV)/.installed-dev  ## offline `bentoml build` (CPU) of $(BUNDLE) [and SPLIT=artifacts/bundle-split, the split layout]
	$(BIN)/python deploy/bento.py build --bundle $(BUNDLE) $(if $(SPLIT),--split $(SPLIT)) --flavour cpu --tag-file $(CONTAINER)/bento-cpu.tag

bento-gpu: $(BUNDLE)/manifest.json | $(VENV)/.installed-dev  ## the same, GPU flavour (deploy/bentofile.gpu.yaml)
	$(BIN)/python deploy/bento.py build --bundle $(BUNDLE) $(if $(SPLIT),--split $(SPLIT)) --flavour gpu --tag-file $(CONTAINER)/bento-gpu.tag

containerfile: bento  ## the Dockerfile `bentoml containerize` uses -> artifacts/container/Dockerfile
	$(BIN)/python deploy/bento.py containerfile --tag "$(call bento_tag,cpu)" --out $(CONTAINER)/Dockerfile

containerfile-gpu: bento-gpu  ## -> artifacts/container/Dockerfile.gpu
	$(BIN)/python deploy/bento.py containerfile --tag "$(call bento_tag,gpu)" --out $(CONTAINER)/Dockerfile.gpu

container-context: bento  ## the full build context, captured without a Docker engine -> artifacts/container/context
	$(BIN)/python deploy/bento.py context --tag "$(call bento_tag,cpu)" --out $(CONTAINER)/context --read-only

smoke-container: container-context  ## serve the captured context from an empty BENTOML_HOME, run deploy/smoke.sh
	$(BIN)/python deploy/bento.py smoke --context $(CONTAINER)/context

image: bento  ## bentoml containerize -> $(IMAGE):<bento version> and $(IMAGE):latest (needs a Docker engine)
	$(BIN)/python deploy/bento.py image --tag "$(call bento_tag,cpu)" --image $(IMAGE)

image-gpu: bento-gpu  ## -> $(IMAGE_GPU):<bento version> and :latest (needs a Docker engine)
	$(BIN)/python deploy/bento.py image --tag "$(call bento_tag,gpu)" --image $(IMAGE_GPU)

k8s-render:  ## kubectl kustomize both overlays -> artifacts/deploy/{cpu,gpu}.yaml
	mkdir -p artifacts/deploy
	kubectl kustomize deploy/overlays/cpu > artifacts/deploy/cpu.yaml
	kubectl kustomize deploy/overlays/gpu > artifacts/deploy/gpu.yaml

test-deploy: install-dev  ## only the bento / container / Kubernetes / compose checks
	$(BIN)/python -m pytest -q -m deploy
