# Tensor-parallel workers as real processes on four GPUs (docs/benchmarks.md,
# "Tensor parallelism on four GPUs"): greedy smoke test (serve TP1 vs TP2,
# disaggregated TP2 -> TP2 over cuda-ipc, TP1 -> TP2 declined to gRPC) and
# goodput of 2 x TP2 aggregated vs 1P TP2 + 1D TP2 disaggregated.
#
#   make bench-gpu-tp         build, stage .device/tp, print the device command
#   (run it on a 4-GPU machine; it returns smoke.tar.gz, goodput.tar.gz, probes.jsonl)
#   make tp-report TP_RESULTS=path/to/goodput.tar.gz
#                             tables + docs/img/goodput-tp.png into docs/benchmarks.md

TP_STAGE ?= .device/tp
TP_RESULTS ?= goodput.tar.gz
TP_PNG ?= docs/img/goodput-tp.png

.PHONY: tp-stage bench-gpu-tp tp-report

tp-stage: goodput-python
	$(CARGO) build --release -p tandem
	mkdir -p $(TP_STAGE)
	strip -o $(TP_STAGE)/tandem $(GOODPUT_TARGET_DIR)/release/tandem
	gzip -9 -f $(TP_STAGE)/tandem
	$(PYTHON) bench/gpu/tokenizer_gguf.py $(GOODPUT_GGUF) $(TP_STAGE)/tokenizer.gguf --vocab 128256
	$(PYTHON) bench/gpu/tp_model_gguf.py $(GOODPUT_GGUF) $(TP_STAGE)/tp-model.gguf
	cp bench/gpu/tp.sh bench/gpu/goodput.sh bench/gpu/greedy_probe.py $(TP_STAGE)/
	@du -sh $(TP_STAGE)

bench-gpu-tp: tp-stage ## Build and stage the 4-GPU tensor-parallel run; prints the device command
	@echo "device call, kind nvidia-h100-x4, carry [\"$(TP_STAGE)\"] (about 5 minutes):"
	@echo "   bash $(TP_STAGE)/tp.sh    # results in \$$OUT: smoke.tar.gz, goodput.tar.gz, probes.jsonl"
	@echo "then: make tp-report TP_RESULTS=<that goodput.tar.gz>"

tp-report: goodput-python ## Tables and plot of a 4-GPU run (TP_RESULTS=goodput.tar.gz) into docs/benchmarks.md
	rm -rf $(GOODPUT_TARGET_DIR)/tp-results && mkdir -p $(GOODPUT_TARGET_DIR)/tp-results
	tar -C $(GOODPUT_TARGET_DIR)/tp-results -xzf $(TP_RESULTS)
	$(PYTHON) bench/goodput_report.py $(GOODPUT_TARGET_DIR)/tp-results/results --section goodput-tp \
	  --ttft-mult $(GOODPUT_TTFT_MULT) --itl-mult $(GOODPUT_ITL_MULT) \
	  --png $(TP_PNG) --out $(GOODPUT_DOC)
