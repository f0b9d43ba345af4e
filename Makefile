# postmesh: every command a developer or CI needs. A fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
GEN_STAMP := postmesh/.generated

.PHONY: all install gen run test lint bench clean docs

all: gen

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Python code and type stubs generated from proto/ (never committed: see .gitignore).
$(GEN_STAMP): $(STAMP) $(PROTOS)
	$(PY) -m postmesh.codegen
	touch $(GEN_STAMP)

gen: $(GEN_STAMP)

## Run the whole mesh on embedded defaults (SQLite under ./var, a local nats-server unless NATS_URL is set).
run: gen
	$(BIN)/postmesh dev

## Run the whole test suite. pytest's exit code 5 ("no tests collected") is a failure here: a suite
## that silently runs nothing must not look green.
test: gen
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$status

lint: gen
	cd proto && ../$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy postmesh services tests

bench: gen
	$(PY) -m postmesh.bench

## Regenerate the README's configuration table from the settings schema.
docs: gen
	$(PY) -m postmesh.docs README.md

clean:
	rm -rf $(VENV) var postmesh/identity postmesh/quota postmesh/sender postmesh/feedback postmesh/events $(GEN_STAMP)
