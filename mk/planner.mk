# Planner targets (included by the top-level Makefile).
# prometheus-tool: the Debian package `prometheus`, which the planner's test against a real
# Prometheus (operator/tests/planner_prometheus.rs) starts on loopback; installed once, when
# missing. bench-planner (top-level Makefile) prints the simulator table.

.PHONY: prometheus-tool

prometheus-tool: ## Install Prometheus (Debian package) for the planner's real-Prometheus test, if missing
	@command -v prometheus >/dev/null 2>&1 || { \
	  echo "installing the Debian package prometheus"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

# Every Rust test run needs it (`cargo test --workspace` includes that test).
test-rust: prometheus-tool
operator-test: prometheus-tool
