# The quick start: `make demo` runs the whole path end to end, `make test` runs the suite.
# Both create the virtual environment first; only Python >= 3.11 is needed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned, so the range in pyproject.toml is already met and pip does not
# pull a multi-GB CUDA build on a CPU machine. Override for your platform, e.g.
# TORCH_SPEC="torch==2.13.0+cu126" with your index configured in pip.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench bench-takeover bench-prefix bench-batch gpu-check gpu-check-wheels lint typecheck unit schema clean

$(BIN)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/streamproc demo

# Naive worker, fixed-window batcher and streamproc on one trace; under 10 minutes here.
bench: $(BIN)/.installed
	$(BIN)/streamproc bench --json bench-report.json --png bench-report.png

# What resuming after a takeover costs: in steady state and per takeover (about 2 minutes).
bench-takeover: $(BIN)/.installed
	$(BIN)/python -m streamproc.devtools.bench.takeover

# The prefix cache on and off on one shared instruction, and its cost on unique prompts.
bench-prefix: $(BIN)/.installed
	$(BIN)/python -m streamproc.devtools.bench.shared_prefix

# 1,000 OpenAI Batch lines through `streamproc batch`, against offline generate().
bench-batch: $(BIN)/.installed
	$(BIN)/python -m streamproc.devtools.bench.openai_batch

# The engine against generate() on a GPU: a random-weight 1B Llama, bf16, batch 1/8/32/128.
# Runs on a machine with torch and transformers and no package registry: what else it
# needs installs from deploy/gpu-check/wheels (fill it here with `make gpu-check-wheels`).
GPU_CHECK_WHEELS := deploy/gpu-check/wheels
gpu-check:
	@$(PYTHON) -c 'import msgspec, aiokafka' 2>/dev/null || \
		$(PYTHON) -m pip install --quiet --no-index --find-links $(GPU_CHECK_WHEELS) msgspec aiokafka
	PYTHONPATH=. $(PYTHON) -m streamproc.devtools.gpu_check --json gpu-check.json

gpu-check-wheels: $(BIN)/.installed
	for v in 3.10 3.11 3.12 3.13; do \
		$(BIN)/python -m pip download --quiet --only-binary=:all: --dest $(GPU_CHECK_WHEELS) \
			--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
			--python-version $$v msgspec aiokafka async-timeout packaging typing-extensions; \
	done
	du -sh $(GPU_CHECK_WHEELS)

lint: $(BIN)/.installed
	$(BIN)/ruff check streamproc tests

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# The suite starts its own local broker unless STREAMPROC_BOOTSTRAP names one.
test: lint typecheck
	$(BIN)/pytest

unit: $(BIN)/.installed
	$(BIN)/pytest -m "not kafka"

schema: $(BIN)/.installed
	$(BIN)/streamproc schema --out topics/schema --asyncapi topics/asyncapi.json
	$(BIN)/streamproc config > docs/configuration.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
