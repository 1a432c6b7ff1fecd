# agent-sidecar: the two commands a fresh machine needs are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The Go programs built from their modules (tools/pins.env) into .tools/bin, and the
# benchmark's load generator built from our own bench/loadgen (the bench tests run it).
# `make install TOOLS=opa` skips SPIRE, Jaeger and the load generator (only the tests,
# `make demo` and `make bench` need them).
TOOLS ?= opa spire jaeger loadgen
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: run test demo proto install tools clean policy-test bench reliability deploy-bundle system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP) tools

## Build the pinned OPA, SPIRE and Jaeger into .tools/bin (once per pin; see tools/pins.env),
## and the load generator (once per change of bench/loadgen).
tools:
	@tools/build.sh $(TOOLS)

## Start the sidecar with a managed OPA on rego/ and the dev identity (examples/dev.yaml).
run: TOOLS = opa
run: install
	$(BIN)/agent-sidecar serve --config examples/dev.yaml

## SPIRE, the sidecar and Jaeger, a few calls of each outcome, where to look; Ctrl-C stops it (README "Demo").
## SPIRE's datastore is PostgreSQL (system-deps).
demo: install system-deps
	$(BIN)/python scripts/demo.py

## Install everything and run the whole test suite, on TEST_WORKERS pytest-xdist workers (CI's 2 cores;
## TEST_WORKERS=0 runs it in one process). `--dist loadfile` runs each test file whole on one worker, in
## order, as one process would: its module fixtures (SPIRE, Jaeger, the fuzzed sidecar) start once. Files
## go to the workers longest first (tests/conftest.py LONG_FILES), not by their number of tests.
TEST_WORKERS ?= 2
test: install system-deps
	$(BIN)/agent-sidecar policy test --lint rego/
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

## Debian packages the tests run for real: PostgreSQL (escalation store, SPIRE's datastore) and
## Chromium (console browser test); a target that needs fewer names them in SYSTEM_PACKAGES.
## Installed only when missing; as root in CI (no tty), else via sudo.
SYSTEM_PACKAGES ?= postgresql chromium
demo reliability: SYSTEM_PACKAGES = postgresql
system-deps:
	@missing=""; \
	for package in $(SYSTEM_PACKAGES); do case $$package in \
	  postgresql) ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql";; \
	  chromium) command -v chromium >/dev/null 2>&1 || missing="$$missing chromium";; \
	esac; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $$missing </dev/null; \
	fi

## Regenerate the gRPC stubs in sidecar/v1 from protos/ (grpc_tools from the venv; no Go tools needed).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/sidecar/v1/sidecar.proto

## The policy tests and the lint (`opa test`, `opa check --strict`): they need OPA only.
policy-test: TOOLS = opa
policy-test: install
	$(BIN)/agent-sidecar policy test --lint rego/

clean:
	rm -rf $(VENV) .pytest_cache

## Reliability suite (docs/reliability.md): crash, collector, OPA, Workload API and
## fuzzing scenarios, fuzzing at 10,000+ generated calls. The soak is separate:
## `.venv/bin/python bench/soak.py --minutes 10 --rate 500`.
reliability: install system-deps
	FUZZ_EXAMPLES=3400 DIFFERENTIAL_EXAMPLES=100 $(BIN)/python -m pytest -q tests/test_reliability_fuzz.py \
	  tests/test_evidence_crash.py tests/test_evidence_canonical.py tests/test_evidence_otel.py \
	  tests/test_opa_client.py tests/test_opa_runner.py tests/test_opa_breaker.py tests/test_opa_sidecar.py \
	  tests/test_opa_differential.py tests/test_identity_workload_api.py tests/test_spire_rotation.py \
	  tests/test_spire_bad_input.py tests/test_jaeger_outage.py tests/test_jaeger_faults.py

## Benchmark: sidecar vs. a bare gRPC floor, then an MCP call through the gateway vs. direct (docs/performance.md).
## Needs OPA and the Go load generator (bench/loadgen, `tools/build.sh loadgen`), not SPIRE or Jaeger.
bench: TOOLS = opa loadgen
bench: install
	$(BIN)/python bench/run.py

## Build rego/ (without dev grants and tests) into deploy/k8s/policy/ as an OPA bundle
## signed with SIGNING_KEY (an RSA private key in PEM, kept out of the repository; docs/deploy.md).
deploy-bundle: TOOLS = opa
deploy-bundle: install
	@test -n "$(SIGNING_KEY)" || { echo "deploy-bundle: SIGNING_KEY is required, the RSA key (PEM) that signs the bundle: make deploy-bundle SIGNING_KEY=path/to/bundle-signing.pem (docs/deploy.md#the-policy-bundle-signed)" >&2; exit 2; }
	$(BIN)/python deploy/sync_bundle.py --signing-key "$(SIGNING_KEY)"
