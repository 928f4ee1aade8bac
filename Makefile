# Developer front door: `make serve` sets everything up and serves the reference guest (in the
# foreground: Ctrl-C stops it); `make test` runs the test suite. Both start from a fresh machine.
# `make upstream` runs an echo upstream for the guest to proxy to.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
UPSTREAM_PORT ?= 9000
UPSTREAM ?= http://127.0.0.1:$(UPSTREAM_PORT)
BIND ?= 127.0.0.1:8080
WORKERS ?= 2

.PHONY: setup guest serve upstream test test-deploy bench

$(BIN)/wasisup: pyproject.toml setup.py supervisor/wasisup/wasi/_hostcall.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/wasisup

guest: setup
	$(BIN)/python guest/build.py guest/proxy -o build/proxy.wasm

serve: guest
	@echo "serving the reference guest on http://$(BIND) (upstream $(UPSTREAM)); Ctrl-C stops it"
	$(BIN)/wasisup -w $(WORKERS) -b $(BIND) --env UPSTREAM=$(UPSTREAM) build/proxy.wasm

upstream:
	$(PYTHON) guest/echo_upstream.py --port $(UPSTREAM_PORT)

test: setup
	$(BIN)/python -m pytest -q tests

test-deploy: setup
	$(BIN)/python -m pytest -q -m deploy tests/test_deploy.py

bench: setup
	$(BIN)/python bench/run.py
	$(BIN)/python bench/proxy.py
	$(BIN)/python bench/inflight.py
