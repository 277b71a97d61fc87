# Goodput on two GPUs (docs/benchmarks.md, "Goodput on two GPUs"): aggregated
# vs disaggregated serving of an 8B-shaped model on a 2-GPU machine.
#
#   make bench-gpu-goodput      build, stage .device/goodput, print the device command
#   (run it on the 2-GPU machine; it returns goodput.tar.gz)
#   make goodput-report GOODPUT_RESULTS=path/to/goodput.tar.gz
#                               tables + docs/img/goodput.png into docs/benchmarks.md
#   make goodput-cpu-test       the whole pipeline here on the CPU, tiny shape and rates

GOODPUT_STAGE ?= .device/goodput
GOODPUT_TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
GOODPUT_GGUF ?= $(HOME)/.cache/tandem/models/SmolLM2-135M-Instruct.Q4_1.gguf
GOODPUT_RESULTS ?= goodput.tar.gz
GOODPUT_PNG ?= docs/img/goodput.png
GOODPUT_DOC ?= docs/benchmarks.md
# Multiples of the light-load TTFT and mean ITL that make the SLOs.
GOODPUT_TTFT_MULT ?= 4
GOODPUT_ITL_MULT ?= 1.5
GOODPUT_CPU_DIR ?= /tmp/tandem-goodput-cpu

.PHONY: goodput-stage bench-gpu-goodput goodput-report goodput-cpu-test goodput-python

goodput-python:
	@$(PYTHON) -c 'import gguf, matplotlib' 2>/dev/null || \
	  $(PYTHON) -m pip install --quiet --disable-pip-version-check gguf matplotlib

goodput-stage: goodput-python
	$(CARGO) build --release -p tandem
	mkdir -p $(GOODPUT_STAGE)
	strip -o $(GOODPUT_STAGE)/tandem $(GOODPUT_TARGET_DIR)/release/tandem
	gzip -9 -f $(GOODPUT_STAGE)/tandem
	# The tokenizer and chat template of the default model, padded to Llama 3's
	# vocabulary: dummy weights need no more (and 94 MiB would not fit a call).
	$(PYTHON) bench/gpu/tokenizer_gguf.py $(GOODPUT_GGUF) $(GOODPUT_STAGE)/tokenizer.gguf --vocab 128256
	cp bench/gpu/goodput.sh $(GOODPUT_STAGE)/goodput.sh
	@du -sh $(GOODPUT_STAGE)

bench-gpu-goodput: goodput-stage ## Build and stage the 2-GPU goodput benchmark; prints the device command
	@echo "device call, kind nvidia-h100-x2, carry [\"$(GOODPUT_STAGE)\"] (under 8 minutes):"
	@echo "   bash $(GOODPUT_STAGE)/goodput.sh    # results in \$$OUT/goodput.tar.gz"
	@echo "then: make goodput-report GOODPUT_RESULTS=<that goodput.tar.gz>"

goodput-report: goodput-python ## Tables and plot of a goodput run (GOODPUT_RESULTS=goodput.tar.gz) into docs/benchmarks.md
	rm -rf $(GOODPUT_TARGET_DIR)/goodput-results && mkdir -p $(GOODPUT_TARGET_DIR)/goodput-results
	tar -C $(GOODPUT_TARGET_DIR)/goodput-results -xzf $(GOODPUT_RESULTS)
	$(PYTHON) bench/goodput_report.py $(GOODPUT_TARGET_DIR)/goodput-results/results \
	  --ttft-mult $(GOODPUT_TTFT_MULT) --itl-mult $(GOODPUT_ITL_MULT) \
	  --png $(GOODPUT_PNG) --out $(GOODPUT_DOC)

goodput-cpu-test: goodput-python ## The goodput script and report here on the CPU (tiny shape, tiny rates)
	$(CARGO) build --release -p tandem
	rm -rf $(GOODPUT_CPU_DIR) && mkdir -p $(GOODPUT_CPU_DIR)
	$(PYTHON) bench/gpu/tokenizer_gguf.py $(GOODPUT_GGUF) $(GOODPUT_CPU_DIR)/tokenizer.gguf
	OUT=$(GOODPUT_CPU_DIR)/out TANDEM_BIN=$(abspath $(GOODPUT_TARGET_DIR))/release/tandem \
	  TOKENIZER=$(GOODPUT_CPU_DIR)/tokenizer.gguf SHAPE=smollm2-135m DEV0=cpu DEV1=cpu \
	  AGG_DEVICE=cpu IPC_TRANSFER=grpc REMOTE_MIN=16 WORKLOADS="64:8 32:16" \
	  RATES_agg_64_8="1 2" RATES_ipc_64_8="1 2" RATES_grpc_64_8="1 2" \
	  RATES_agg_32_16="2" RATES_ipc_32_16="2" RATES_grpc_32_16="2" DURATION=6 DRAIN=3 \
	  CALIB_N=3 ENGINE_ARGS="--max-batch-tokens 8192 --max-num-seqs 256 --threads 1" \
	  WARMUP_ARGS="--concurrency 2 --num-requests 2 --output-len 4" TIME_LIMIT=900 \
	  bash bench/gpu/goodput.sh
	mkdir -p $(GOODPUT_CPU_DIR)/unpacked
	tar -C $(GOODPUT_CPU_DIR)/unpacked -xzf $(GOODPUT_CPU_DIR)/out/goodput.tar.gz
	$(PYTHON) bench/goodput_report.py $(GOODPUT_CPU_DIR)/unpacked/results --warmup 1 \
	  --png $(GOODPUT_CPU_DIR)/goodput.png
