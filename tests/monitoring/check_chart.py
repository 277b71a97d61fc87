"""Renders charts/tandem-operator with `helm template` and checks its monitoring objects
(`make monitoring-test`):

- with monitoring.coreos.com/v1 served and the values on: three PodMonitors (frontend, prefill,
  decode) whose relabelling gives the labels manifests/prometheus/scrape-config.yaml gives, one
  PrometheusRule whose groups are files/tandem-rules.yaml (promtool checks the rendered copy),
  the dashboard ConfigMap with the sidecar label, and the operator's ServiceMonitor keeping the
  planner's own `namespace` label;
- without that API: no PodMonitor, PrometheusRule or ServiceMonitor, whatever the values (the
  dashboard ConfigMap needs no CRD and follows its own value);
- with the values off: none of them.

Usage: check_chart.py --helm PATH [--promtool PATH]"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "tandem-operator"
RULES = CHART / "files" / "tandem-rules.yaml"
DASHBOARD = CHART / "files" / "tandem-dashboard.json"
SCRAPE_CONFIG = ROOT / "manifests" / "prometheus" / "scrape-config.yaml"
MONITORING_API = "monitoring.coreos.com/v1"
ALL_ON = [
    "monitoring.podMonitors.enabled=true",
    "monitoring.rules.enabled=true",
    "monitoring.dashboard.enabled=true",
    "serviceMonitor.enabled=true",
]

failures = []


def check(condition, message):
    if not condition:
        failures.append(message)
    return condition


def render(helm, sets, api=True, extra=()):
    cmd = [helm, "template", "tandem", str(CHART), "--namespace", "tandem-system"]
    if api:
        cmd += ["--api-versions", MONITORING_API]
    for s in sets:
        cmd += ["--set", s]
    cmd += list(extra)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def dashboard_configmaps(docs):
    return [d for d in of_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]


def raw_job_relabels():
    """target label -> source labels of the raw Kubernetes scrape job."""
    config = yaml.safe_load(yaml.safe_load(SCRAPE_CONFIG.read_text())["data"]["prometheus.yml"])
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "tandem-pods")
    return {
        r["target_label"]: r["source_labels"]
        for r in job["relabel_configs"]
        if r.get("action", "replace") == "replace" and r["target_label"] in ("namespace", "pod", "deployment", "tier")
    }


def promtool_check(promtool, groups, label):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(groups, f)
        f.flush()
        r = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    check(r.returncode == 0, f"{label}: promtool check rules failed:\n{r.stdout}{r.stderr}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--helm", required=True)
    parser.add_argument("--promtool", default="promtool")
    args = parser.parse_args()
    helm = args.helm

    # Everything on, the Prometheus Operator's API served.
    docs = render(helm, ALL_ON)
    monitors = of_kind(docs, "PodMonitor")
    check(len(monitors) == 3, f"expected 3 PodMonitors, got {len(monitors)}")
    tiers = sorted(m["spec"]["selector"]["matchLabels"].get("tandem.dev/tier") for m in monitors)
    check(tiers == ["decode", "frontend", "prefill"], f"PodMonitor tiers: {tiers}")
    expected = raw_job_relabels()
    check(set(expected) == {"namespace", "pod", "deployment", "tier"}, f"raw scrape job relabels: {expected}")
    for m in monitors:
        name = m["metadata"]["name"]
        spec = m["spec"]
        check(spec["namespaceSelector"] == {"any": True}, f"{name}: namespaceSelector {spec['namespaceSelector']}")
        check(spec["selector"]["matchLabels"].get("app.kubernetes.io/name") == "tandem", f"{name}: selector")
        check({"key": "tandem.dev/deployment", "operator": "Exists"} in spec["selector"].get("matchExpressions", []),
              f"{name}: does not require the tandem.dev/deployment label")
        (endpoint,) = spec["podMetricsEndpoints"]
        check(endpoint["port"] == "http" and endpoint["path"] == "/metrics", f"{name}: endpoint {endpoint}")
        got = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        check(got == expected, f"{name}: relabelings {got} differ from the raw scrape job's {expected}")

    (rule,) = of_kind(docs, "PrometheusRule") or [None]
    if check(rule is not None, "expected 1 PrometheusRule"):
        check(len(of_kind(docs, "PrometheusRule")) == 1, "more than one PrometheusRule")
        file_groups = yaml.safe_load(RULES.read_text())
        check(rule["spec"] == file_groups, "the PrometheusRule's groups differ from files/tandem-rules.yaml")
        promtool_check(args.promtool, rule["spec"], "rendered PrometheusRule")

    cms = dashboard_configmaps(docs)
    if check(len(cms) == 1, f"expected 1 dashboard ConfigMap, got {len(cms)}"):
        cm = cms[0]
        check(cm["metadata"]["labels"].get("grafana_dashboard") == "1", f"dashboard labels {cm['metadata']['labels']}")
        check(cm["metadata"]["namespace"] == "tandem-system", "dashboard namespace")
        check(cm["data"]["tandem.json"] == DASHBOARD.read_text().rstrip("\n"), "ConfigMap JSON differs from the file")
        check(json.loads(cm["data"]["tandem.json"]).get("uid") == "tandem", "dashboard JSON has no uid tandem")

    (sm,) = of_kind(docs, "ServiceMonitor") or [None]
    if check(sm is not None, "expected the operator's ServiceMonitor"):
        check(sm["spec"]["endpoints"][0].get("honorLabels") is True,
              "the operator's ServiceMonitor must honor labels: the planner's `namespace` label would be renamed")

    # A watched namespace narrows the PodMonitors to it; sidecar label and namespace are values.
    docs = render(helm, ALL_ON + [
        "watchNamespace=tandem", "monitoring.dashboard.labelName=tandem_dashboards",
        "monitoring.dashboard.labelValue=yes", "monitoring.dashboard.namespace=monitoring",
        "monitoring.podMonitors.labels.release=kps",
    ])
    for m in of_kind(docs, "PodMonitor"):
        check(m["spec"]["namespaceSelector"] == {"matchNames": ["tandem"]},
              f"{m['metadata']['name']}: namespaceSelector with watchNamespace: {m['spec']['namespaceSelector']}")
        check(m["metadata"]["labels"].get("release") == "kps", "monitoring.podMonitors.labels not applied")
    (cm,) = dashboard_configmaps(docs)
    check(cm["metadata"]["labels"].get("tandem_dashboards") == "yes" and "grafana_dashboard" not in cm["metadata"]["labels"],
          f"dashboard label from values: {cm['metadata']['labels']}")
    check(cm["metadata"]["namespace"] == "monitoring", "dashboard namespace from values")

    # Other objectives: only the buckets they read change, and the result still passes promtool.
    docs = render(helm, ALL_ON + ["monitoring.rules.ttftObjectiveSeconds=1", "monitoring.rules.itlObjectiveSeconds=0.06"])
    (rule,) = of_kind(docs, "PrometheusRule")
    text = "\n".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    check('time_to_first_token_seconds_bucket{le="1"}' in text and 'time_to_first_token_seconds_bucket{le="0.5"}' not in text,
          "ttftObjectiveSeconds=1 did not move the TTFT bucket")
    check('inter_token_latency_seconds_bucket{le="0.06"}' in text and 'inter_token_latency_seconds_bucket{le="0.1"}' not in text,
          "itlObjectiveSeconds=0.06 did not move the ITL bucket")
    default = RULES.read_text().replace('time_to_first_token_seconds_bucket{le="0.5"}', 'time_to_first_token_seconds_bucket{le="1"}')
    default = default.replace('inter_token_latency_seconds_bucket{le="0.1"}', 'inter_token_latency_seconds_bucket{le="0.06"}')
    check(rule["spec"] == yaml.safe_load(default), "objectives changed more than the buckets")
    promtool_check(args.promtool, rule["spec"], "PrometheusRule with other objectives")

    # No Prometheus Operator API: nothing that needs it, whatever the values.
    docs = render(helm, ALL_ON, api=False)
    for kind in ("PodMonitor", "PrometheusRule", "ServiceMonitor"):
        check(not of_kind(docs, kind), f"{kind} rendered although {MONITORING_API} is not served")
    check(len(dashboard_configmaps(docs)) == 1, "the dashboard ConfigMap needs no CRD but was not rendered")

    # Values off (the defaults), API served: none.
    docs = render(helm, [])
    for kind in ("PodMonitor", "PrometheusRule", "ServiceMonitor"):
        check(not of_kind(docs, kind), f"{kind} rendered with its value off")
    check(not dashboard_configmaps(docs), "dashboard ConfigMap rendered with its value off")

    if failures:
        print("chart monitoring check FAILED:", *failures, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print("chart monitoring check: ok (3 PodMonitors, 1 PrometheusRule, dashboard ConfigMap, ServiceMonitor; none without the API)")


if __name__ == "__main__":
    main()
