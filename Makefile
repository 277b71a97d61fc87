# Tandem — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CARGO ?= cargo
PYTHON ?= python3
VENV := .venv
# Cargo builds into $(CARGO_TARGET_DIR) when it is set (a shared build cache), else target/.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
TANDEM := $(TARGET_DIR)/release/tandem
PORT ?= 8000
export CARGO_TERM_COLOR ?= never

# Per-area targets (operator, e2e, ...) live in mk/*.mk.
include $(wildcard mk/*.mk)

.PHONY: help run build model venv nvrtc test test-rust test-python lint bench bench-cpu bench-disagg bench-transfer bench-planner

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

build: ## Build the tandem binary (release)
	$(CARGO) build --release -p tandem

model: build ## Fetch the default model (SmolLM2-135M-Instruct) into the cache, once
	$(TANDEM) model fetch

run: model ## Serve the default model disaggregated (1 prefill + 1 decode) on http://127.0.0.1:$(PORT) (OpenAI API)
	$(TANDEM) local --prefill 1 --decode 1 --port $(PORT)

venv: $(VENV)/.installed ## Python venv with the official openai client and pytest
$(VENV)/.installed: tests/python/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
	touch $@

lint: ## cargo fmt --check and clippy -D warnings
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings

# NVRTC, the CUDA headers and ptxas from PyPI (no GPU needed): the Rust tests compile the CUDA
# kernels with them for sm_90a, sm_90 and sm_80, against the same headers the worker image ships,
# and assemble the sm_90a PTX (inline wgmma included) with ptxas.
NVRTC_WHEELS := nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88 nvidia-cuda-nvcc==13.0.88
NVRTC_DIR := $(HOME)/.cache/tandem/cuda-13.0.88
NVRTC_ENV := TANDEM_REQUIRE_NVRTC=1 LD_LIBRARY_PATH=$(NVRTC_DIR)/nvidia/cu13/lib$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH} TANDEM_CUDA_INCLUDE=$(NVRTC_DIR)/nvidia/cu13/include TANDEM_PTXAS=$(NVRTC_DIR)/nvidia/cu13/bin/ptxas

nvrtc: $(NVRTC_DIR)/.installed-ptxas ## NVRTC, CUDA headers and ptxas (PyPI wheels) for compiling the kernels without a GPU
$(NVRTC_DIR)/.installed-ptxas: | $(VENV)/.installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps --upgrade --target $(NVRTC_DIR) $(NVRTC_WHEELS)
	test -f $(NVRTC_DIR)/nvidia/cu13/lib/libnvrtc.so.13 -a -f $(NVRTC_DIR)/nvidia/cu13/include/cuda_bf16.h
	$(NVRTC_DIR)/nvidia/cu13/bin/ptxas --version
	touch $@

test-rust: model nvrtc ## Every Rust test (unit, integration, real-model process tests)
	$(NVRTC_ENV) TANDEM_BIN=$(abspath $(TANDEM)) $(CARGO) test --workspace --release

test-python: model venv ## The official openai client against a real `tandem serve`
	TANDEM_BIN=$(abspath $(TANDEM)) $(VENV)/bin/python -m pytest -q tests/python

test: lint test-rust test-python $(TEST_EXTRA) ## Everything CI runs
	@echo "make test: all green"

LLAMA_CPP_WHEELS := $(HOME)/.cache/tandem/wheels
# llama.cpp's AMX path crashed on this model's multi-token prompts here: build without it.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_OPENMP=ON

bench: bench-cpu bench-transfer bench-disagg bench-planner ## Every CPU benchmark; results in docs/benchmarks.md

bench-cpu: model venv ## Engine vs llama.cpp on the same GGUF; writes docs/benchmarks.md
	mkdir -p $(LLAMA_CPP_WHEELS)
	$(VENV)/bin/python -c 'import llama_cpp' 2>/dev/null || { \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(VENV)/bin/pip wheel --no-deps -w $(LLAMA_CPP_WHEELS) --find-links $(LLAMA_CPP_WHEELS) llama-cpp-python==0.3.36 && \
	  $(VENV)/bin/pip install --find-links $(LLAMA_CPP_WHEELS) llama-cpp-python==0.3.36; }
	$(VENV)/bin/python bench/cpu_bench.py --tandem $(TANDEM) --out docs/benchmarks.md

bench-transfer: ## KV transfer GB/s over loopback gRPC, 8B-shaped KV (table on stdout)
	$(CARGO) test --release -p tandem --test transfer_throughput -- --ignored --nocapture

bench-disagg: model ## TTFT of 1 prefill + 1 decode vs tandem serve, remote-prefill overhead; writes docs/benchmarks.md
	$(PYTHON) bench/disagg_bench.py --tandem $(TANDEM) --out docs/benchmarks.md

bench-planner: ## Planner vs the best static allocation on simulated traces (table on stdout)
	$(CARGO) run --release -p tandem-operator --bin planner-sim -- --seeds 1,2,3,4,5,6,7,8
