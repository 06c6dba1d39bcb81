# The two commands: `make demo` and `make test`. Both create the environment in .venv/ first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUF_VERSION := 1.75.0
BUF := build/npm/node_modules/.bin/buf
# Torch's OpenMP threads busy-wait between steps by default, which starves everything else on a
# small shared machine (the tests run servers and trainings side by side).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: venv demo test check lint-protos protos go-protos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, by exact pin: pip takes them from the machine's local wheels.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(STAMP)

demo: venv
	$(PY) -m o2u_client.demo

test: venv
	$(PY) -m pytest -q --durations=15  # the slowest tests, for keeping the suite within its budget

check: venv
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) protos/generate.py --check $$(command -v protoc-gen-go >/dev/null && command -v protoc-gen-go-grpc >/dev/null && echo --go)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix build/npm @bufbuild/buf@$(BUF_VERSION)

lint-protos: $(BUF)
	cd protos && ../$(BUF) lint

protos: venv
	$(PY) protos/generate.py

go-protos: venv
	$(PY) protos/generate.py --go

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache
