# `make run-autoscaled` (included by the top-level Makefile): `tandem local` with the default model,
# a Prometheus on loopback scraping its processes through `tandem local --prometheus-sd-file`,
# and `planner-local` resizing the tiers through the control endpoint from TTFT/ITL SLOs.
# docs/local.md ("Autoscaling `tandem local`") explains it. Ctrl-C stops all three.
#
#   make run-autoscaled TTFT_P90_MS=800 ITL_P90_MS=100 PREFILL_MAX=3 PLANNER_ARGS='--cooldown-secs 20'

AUTOSCALED_DIR ?= $(or $(TMPDIR),/tmp)/tandem-autoscaled
PROMETHEUS_PORT ?= 9090
CONTROL_PORT ?= 9100
TTFT_P90_MS ?= 1500
ITL_P90_MS ?= 250
PREFILL_MAX ?= 2
DECODE_MAX ?= 2
PLANNER_INTERVAL_SECS ?= 5
PLANNER_ARGS ?=
LOCAL_ARGS ?= --worker-arg '--threads 1'
PLANNER_LOCAL := $(TARGET_DIR)/release/planner-local

.PHONY: run-autoscaled planner-local

planner-local: ## Build the planner-local binary (release)
	$(CARGO) build --release -p tandem-operator --bin planner-local

run-autoscaled: model prometheus-tool planner-local ## tandem local + Prometheus + planner-local: SLO autoscaling on http://127.0.0.1:$(PORT)
	@set -euo pipefail; dir="$(AUTOSCALED_DIR)"; mkdir -p "$$dir"; \
	printf 'global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n- job_name: tandem-local\n  file_sd_configs:\n  - files: [%s/targets.json]\n    refresh_interval: 5s\n' "$$dir" > "$$dir/prometheus.yml"; \
	pids=(); trap 'kill "$${pids[@]}" 2>/dev/null; wait' EXIT; \
	prometheus --config.file="$$dir/prometheus.yml" --storage.tsdb.path="$$dir/tsdb" \
	  --web.listen-address=127.0.0.1:$(PROMETHEUS_PORT) --log.level=warn & pids+=($$!); \
	$(TANDEM) local --prefill 1 --decode 1 --port $(PORT) --control-port $(CONTROL_PORT) \
	  --endpoints-file "$$dir/endpoints.json" --prometheus-sd-file "$$dir/targets.json" \
	  --log-dir "$$dir/logs" $(LOCAL_ARGS) & pids+=($$!); \
	until curl -sf http://127.0.0.1:$(CONTROL_PORT)/tiers >/dev/null; do sleep 1; done; \
	echo "Prometheus: http://127.0.0.1:$(PROMETHEUS_PORT)  worker logs: $$dir/logs"; \
	$(PLANNER_LOCAL) --prometheus http://127.0.0.1:$(PROMETHEUS_PORT) --control http://127.0.0.1:$(CONTROL_PORT) \
	  --ttft-p90-ms $(TTFT_P90_MS) --itl-p90-ms $(ITL_P90_MS) --prefill-max $(PREFILL_MAX) --decode-max $(DECODE_MAX) \
	  --interval-secs $(PLANNER_INTERVAL_SECS) --window-secs 20 --cooldown-secs 30 --scale-down-stabilization-secs 60 \
	  --replica-startup-secs 15 --lookahead-secs 30 $(PLANNER_ARGS) & pids+=($$!); \
	wait -n "$${pids[@]}"
