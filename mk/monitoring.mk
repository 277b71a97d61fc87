# Monitoring targets (included by the top-level Makefile); docs/monitoring.md.
# monitoring-test: `promtool check rules` and `promtool test rules` on the chart's rule file
# (charts/tandem-operator/files/tandem-rules.yaml, tests in tests/monitoring/), and the chart's
# PodMonitors, PrometheusRule and dashboard ConfigMap as `helm template` renders them with and
# without the Prometheus Operator's API (tests/monitoring/check_chart.py).
# The dashboard's queries run against a real Prometheus scraping `tandem local` in test-python
# (tests/python/test_dashboard.py), which therefore needs the Debian prometheus too, and
# planner-local (mk/localloop.mk) for the planner panels.

RULES_FILE = $(CHART)/files/tandem-rules.yaml

.PHONY: monitoring-test

monitoring-test: prometheus-tool kube-tools venv ## promtool check/test of the alert rules; helm template check of PodMonitors, PrometheusRule, dashboard
	promtool check rules $(RULES_FILE)
	promtool test rules tests/monitoring/tandem-rules.test.yaml
	$(HELM) lint --strict $(CHART) --set monitoring.podMonitors.enabled=true --set monitoring.rules.enabled=true --set monitoring.dashboard.enabled=true
	$(VENV)/bin/python tests/monitoring/check_chart.py --helm $(HELM) --promtool promtool

test-python: prometheus-tool planner-local

TEST_EXTRA += monitoring-test
