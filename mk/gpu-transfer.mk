# KV transfer between GPU workers (cuda-ipc and gRPC) on a 2-GPU machine.
# Builds the release binary here, stages it with bench/gpu/transfer.sh in
# .device/cudaipc (ignored by git; carried to the GPU machine) and prints the
# one command to run there. No model is needed: the bench uses dummy weights
# and token ids.

GPU_TRANSFER_STAGE := .device/cudaipc
GPU_TRANSFER_TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)

.PHONY: gpu-transfer-stage bench-gpu-transfer

gpu-transfer-stage:
	$(CARGO) build --release -p tandem
	mkdir -p $(GPU_TRANSFER_STAGE)
	strip -o $(GPU_TRANSFER_STAGE)/tandem $(GPU_TRANSFER_TARGET_DIR)/release/tandem
	gzip -9 -f $(GPU_TRANSFER_STAGE)/tandem
	cp bench/gpu/transfer.sh $(GPU_TRANSFER_STAGE)/transfer.sh
	@du -sh $(GPU_TRANSFER_STAGE)

bench-gpu-transfer: gpu-transfer-stage ## Stage the KV transfer checks and benchmark (2 GPUs); prints the device command
	@echo "device call on a 2-GPU kind (nvidia-h100-x2), carry [\"$(GPU_TRANSFER_STAGE)\"]:"
	@echo "   bash $(GPU_TRANSFER_STAGE)/transfer.sh    # logs and JSON lines in \$$OUT"
