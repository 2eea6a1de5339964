# finetune-worker: every target does the setup it needs, so a fresh clone needs only
#   make run    (the standalone demo on the embedded tiny model)
#   make test   (Python and Elixir test suites)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FW := $(VENV)/bin/finetune-worker
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
#: What the tests, benchmarks and lint need on top of the demo's install (see pyproject.toml).
DEV_EXTRAS := test,dev,bench,tracking,merge,qlora,preference,sweep,export,llamacpp
#: llama-cpp-python (the llamacpp extra) compiles llama.cpp: the library only, no OpenMP runtime to clash with torch's.
LLAMACPP_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF
TINY := .tiny/model
PYTEST_ARGS ?=
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MIX_ENV ?= test

.PHONY: setup setup-dev elixir run test test-python test-elixir test-slow bench lint format clean

# setup: what the demo needs and nothing more; setup-dev: the extras tests, bench and lint use.
setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# torch goes in first and pinned: where pip offers the local CPU wheel of 2.13.0 it takes that
# in seconds instead of resolving a multi-GB CUDA build as a dependency of transformers.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS) $$CMAKE_ARGS" $(PY) -m pip install -q -e '.[$(DEV_EXTRAS)]'
	touch $(DEV_STAMP)

# Erlang/Elixir from the distribution (hex.pm is not needed: the bridge has no hex deps).
elixir:
	@command -v mix >/dev/null 2>&1 || bash scripts/install-elixir.sh

$(TINY)/config.json: | $(STAMP)
	$(FW) make-tiny-model $(TINY)

run: setup $(TINY)/config.json
	$(FW) run configs/tiny-lora.json

test: test-python test-elixir

# Erlang/Elixir first: without them the Erlang-backed Python tests would skip.
test-python: setup-dev elixir
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-elixir: setup-dev elixir
	mix test

# pytest exits 5 when no test is marked slow: that is not a failure.
test-slow: setup-dev elixir
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: setup-dev $(TINY)/config.json
	$(PY) -m bench.run

# Wheels for bench/gpu_device.sh on a lent GPU machine (Python 3.12, no registry). A run carries
# at most 64 MiB: the default set is what is small (~10 MB); add the big ones that machine lacks,
# e.g. `make gpu-wheels GPU_WHEELS_BIG="pyarrow pandas"` (~67 MB) or "bitsandbytes" (~43 MB), not all.
GPU_WHEELS_PY ?= 3.12
GPU_WHEELS_BIG ?=
gpu-wheels: setup-dev
	rm -rf .gpu-wheels && mkdir -p .gpu-wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_WHEELS_PY) \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform manylinux_2_24_x86_64 --platform any -d .gpu-wheels \
	  $$($(PY) bench/gpu_wheels.py $(GPU_WHEELS_BIG))
	du -sh .gpu-wheels

lint: setup-dev elixir
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/ruff format --check python tests bench
	$(VENV)/bin/mypy
	mix format --check-formatted
	mix compile --warnings-as-errors --force

format: setup-dev
	$(VENV)/bin/ruff check --fix python tests bench
	$(VENV)/bin/ruff format python tests bench
	mix format

clean:
	rm -rf _build .tiny runs .pytest_cache
