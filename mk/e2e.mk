# End-to-end targets (included by the top-level Makefile): a real Kubernetes 1.35 control
# plane built from Kubernetes' Go modules (e2e/controlplane/), kwok fake nodes, the chart
# installed with helm, the operator run as the chart's ServiceAccount. See e2e/README.md.

E2E_OPERATOR_BIN := $(or $(CARGO_TARGET_DIR),$(CURDIR)/target)/release/tandem-operator

.PHONY: e2e e2e-bins e2e-cluster e2e-cluster-down e2e-suite e2e-scale

e2e-bins: ## Build (once; cached by go.sum) apiserver, controller-manager, scheduler, etcd, kwok
	./hack/e2e-build.sh

e2e-cluster: kube-tools ## Start the e2e control plane in the background; prints its KUBECONFIG
	./hack/e2e-cluster.sh up

e2e-cluster-down: ## Stop the e2e control plane
	./hack/e2e-cluster.sh down

# prometheus-tool (mk/planner.mk): the suite's planner step starts a real Prometheus on loopback.
e2e: kube-tools prometheus-tool ## Operator e2e suite on a fresh local control plane (started and stopped)
	./hack/e2e-run.sh suite

e2e-suite: kube-tools prometheus-tool ## The e2e suite against the cluster KUBECONFIG names (see e2e/README.md)
	cd e2e/controlplane && TANDEM_OPERATOR_BIN=$(E2E_OPERATOR_BIN) go test ./suite -run '^TestE2E$$' -v -count=1 -timeout 15m

e2e-scale: kube-tools ## 200 DisaggDeployments x 25 pods under kwok; writes docs/benchmarks.md
	./hack/e2e-run.sh scale

TEST_EXTRA += e2e
