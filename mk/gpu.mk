# The CUDA backend on a GPU machine. The GPU machine has no Rust toolchain, so
# these targets build a release binary here, stage it in .device/ (ignored by
# git; carried to the GPU machine) and print what to run there. The default
# model (94 MiB) does not fit one call's 64 MiB carry limit next to the binary:
# its first 60 MiB go in .device/gpu-model, sent in a call of its own just
# before (the machine keeps it while warm).

GPU_STAGE := .device/gpu
GPU_MODEL_STAGE := .device/gpu-model
GPU_TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
DEFAULT_GGUF ?= $(HOME)/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf
TORCH_BASELINE ?= bench/torch_baseline.py
GPU_MODEL_SPLIT := 62914560

.PHONY: gpu-stage gpu-check bench-gpu

gpu-stage:
	$(CARGO) build --release -p tandem
	mkdir -p $(GPU_STAGE) $(GPU_MODEL_STAGE)
	strip -o $(GPU_STAGE)/tandem $(GPU_TARGET_DIR)/release/tandem
	gzip -9 -f $(GPU_STAGE)/tandem
	cp bench/gpu/run.sh $(GPU_STAGE)/run.sh
	head -c $(GPU_MODEL_SPLIT) $(DEFAULT_GGUF) > $(GPU_MODEL_STAGE)/default.gguf.part-a
	tail -c +$$(($(GPU_MODEL_SPLIT) + 1)) $(DEFAULT_GGUF) > $(GPU_STAGE)/default.gguf.part-b
	@du -sh $(GPU_STAGE) $(GPU_MODEL_STAGE)

gpu-check: gpu-stage ## Build and stage the GPU correctness checks; prints the device commands
	@echo "1. device call, carry [\"$(GPU_MODEL_STAGE)\"]: true"
	@echo "2. at once (within 30 s), carry [\"$(GPU_STAGE)\"]:"
	@echo "   bash $(GPU_STAGE)/run.sh check"

bench-gpu: gpu-stage ## Build and stage the GPU benchmarks and the PyTorch peer; prints the device commands
	cp $(TORCH_BASELINE) $(GPU_STAGE)/torch_baseline.py
	@echo "1. device call, carry [\"$(GPU_MODEL_STAGE)\"]: true"
	@echo "2. at once (within 30 s), carry [\"$(GPU_STAGE)\"]:"
	@echo "   bash $(GPU_STAGE)/run.sh all    # checks, Tandem bench, PyTorch peer; logs in \$$OUT"

.PHONY: bench-constrained-gpu
bench-constrained-gpu: goodput-python ## Stage the GPU checks and the JSON-schema decode bench (8B shape) in one call; prints the device command
	$(CARGO) build --release -p tandem
	mkdir -p $(GPU_STAGE)
	strip -o $(GPU_STAGE)/tandem $(GPU_TARGET_DIR)/release/tandem
	gzip -9 -f $(GPU_STAGE)/tandem
	$(PYTHON) bench/gpu/tokenizer_gguf.py $(DEFAULT_GGUF) $(GPU_STAGE)/tokenizer.gguf --vocab 128256
	cp bench/constrained/run.sh bench/constrained/schema.json bench/constrained/gpu.sh bench/constrained/validate.py $(GPU_STAGE)/
	@echo "device call, carry [\"$(GPU_STAGE)\"]: bash $(GPU_STAGE)/gpu.sh    # logs and JSON lines in \$$OUT"
