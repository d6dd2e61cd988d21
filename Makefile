# The two commands of the README: `make dev` (a complete local run) and `make test` (the whole suite).
# Both set up what they need on a fresh machine: a venv in .venv, and npm peer packages for the tests.
VENV ?= .venv
PYTHON ?= python3
PYTEST_ARGS ?= -q

.PHONY: dev test lint bench clean stubs

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

tests/peers/node_modules/.installed: tests/peers/package.json tests/peers/package-lock.json
	cd tests/peers && npm ci --no-audit --no-fund --loglevel=error
	touch $@

dev: $(VENV)/.base
	$(VENV)/bin/listenerd dev

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .

test: $(VENV)/.test tests/peers/node_modules/.installed lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench: $(VENV)/.test tests/peers/node_modules/.installed
	$(VENV)/bin/python bench/run_all.py

# The Pub/Sub API stubs are committed (listenerd/proto/*_pb2*.py); regenerate after editing the .proto.
stubs: $(VENV)/.test
	$(VENV)/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. listenerd/proto/pubsub_api.proto

clean:
	rm -rf $(VENV) tests/peers/node_modules
