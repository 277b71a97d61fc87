# The CUDA backend on a GPU machine. The GPU machine has no Rust toolchain, so
# these targets build a release binary here, stage it in $(GPU_DIR) (ignored by
# git, carried to the GPU machine) and print the one command to run there.

GPU_DIR ?= .device
GPU_TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
DEFAULT_GGUF ?= $(HOME)/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf
TORCH_BASELINE ?= ../shared/bench/torch_baseline.py

.PHONY: gpu-stage gpu-check bench-gpu

gpu-stage:
	$(CARGO) build --release -p tandem
	mkdir -p $(GPU_DIR)
	strip -o $(GPU_DIR)/tandem $(GPU_TARGET_DIR)/release/tandem
	@du -sh $(GPU_DIR)

gpu-check: gpu-stage ## Build and stage the binary for the GPU checks; prints the command to run there
	cp $(DEFAULT_GGUF) $(GPU_DIR)/default.gguf
	@echo "On the GPU machine (carry $(GPU_DIR); the default model is ~94 MiB: if the"
	@echo "carry limit is lower, send $(GPU_DIR)/default.gguf ahead in a separate call):"
	@echo "  $(GPU_DIR)/tandem gpu check --model $(GPU_DIR)/default.gguf"

bench-gpu: gpu-stage ## Build and stage the binary and the PyTorch baseline; prints the benchmark command
	cp $(TORCH_BASELINE) $(GPU_DIR)/torch_baseline.py
	@echo "On the GPU machine (carry $(GPU_DIR)), Tandem and the PyTorch peer in one call:"
	@echo '  $(GPU_DIR)/tandem gpu bench --json $$OUT/tandem_gpu_bench.json && python3 $(GPU_DIR)/torch_baseline.py'
