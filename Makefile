# The two commands of the README: `make test` and `make demo`. Both create .venv when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch lies on the development machines' disk; on a CUDA machine the same pin takes
# PyPI's CUDA build. Override to use another: make test TORCH_SPEC='torch==2.9.1'
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: setup test test-gpu gpu-check demo lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py pipeline/images/_resample.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

test: setup
	$(PY) -m ruff check pipeline deployments llava_features tests scripts/gpu-check
	$(PY) -m pytest $(PYTEST_ARGS)

# The GPU tests (tests/gpu: CUDA vs the CPU reference, compile modes, streams, nvJPEG, memory; the
# Ray-level ones where Ray is installed). Every one is skipped, with its reason, without CUDA.
test-gpu: setup
	$(PY) -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

# The prepared device check (tests, benchmarks, profile) in one command; results in gpu-check-out/.
gpu-check:
	$(PYTHON) scripts/gpu-check $(GPU_CHECK_ARGS)

demo: setup
	$(VENV)/bin/llava-features demo

lint: setup
	$(PY) -m ruff check pipeline deployments llava_features tests scripts/gpu-check
	$(PY) -m ruff format --check pipeline deployments llava_features tests scripts/gpu-check

bench: setup
	$(VENV)/bin/llava-features bench all --tiny --json bench.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output
