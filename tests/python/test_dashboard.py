"""Every query of the Grafana dashboard (charts/tandem-operator/files/tandem-dashboard.json)
returns series from a real Prometheus scraping a real, loaded `tandem local`.

`tandem local --prefill 1 --decode 1` (the binary in $TANDEM_BIN) serves; the Debian `prometheus`
on loopback scrapes its three processes every second, each target labelled as the Kubernetes
scrape (PodMonitors or manifests/prometheus/scrape-config.yaml) labels a pod: `namespace`, `pod`,
`deployment`, `tier`, and evaluates the chart's rule file, whose recording rules the dashboard
reads. The official `openai` client sends streamed chat requests: long prompts (prefilled
remotely, their KV shipped over gRPC), several sharing a long prefix (prefix-cache hits), short
ones (prefilled locally). Then each panel's targets, with the dashboard's variables set as a
user would set them (one namespace/deployment/model, and "All"), run on /api/v1/query and must
return a series with a value.

The planner panels read `planner-local` (the operator's planner over `tandem local`, the binary
next to $TANDEM_BIN or $TANDEM_PLANNER_LOCAL_BIN), which serves the operator's `tandem_planner_*`
series; its bounds hold each tier at one replica so the load is not resized under the test.
The one target whose series only Kubernetes exports is listed below with the reason; for it the
test checks that the query is valid PromQL and that nothing here exports it (so the list cannot
outlive its reason)."""
import concurrent.futures
import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from conftest import Process, Prometheus, free_port, tandem_bin, wait_for

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "charts" / "tandem-operator" / "files" / "tandem-dashboard.json"
RULES = ROOT / "charts" / "tandem-operator" / "files" / "tandem-rules.yaml"
NAMESPACE = "tandem-test"
DEPLOYMENT = "dash"

# (panel title, refId) -> why no process of this test exports its series.
NEEDS_KUBERNETES = "kube-state-metrics' kube_pod_status_ready: pod readiness exists only in Kubernetes"
NOT_HERE = {
    ("Replicas per tier: desired, scraped, ready", "C"): NEEDS_KUBERNETES,
}


def planner_local_bin():
    path = os.environ.get("TANDEM_PLANNER_LOCAL_BIN") or str(Path(tandem_bin()).with_name("planner-local"))
    if not Path(path).is_file():
        pytest.fail(f"{path} does not exist: `cargo build --release -p tandem-operator --bin planner-local` "
                    "(make test-python builds it), or set TANDEM_PLANNER_LOCAL_BIN")
    return path

# Grafana's built-in interval variables, as a dashboard over the last few minutes with a
# 15 s scrape would set them; the whole test fits in them.
BUILTINS = {"__rate_interval": "2m", "__interval": "1m", "__range": "5m"}

SHARED_PREFIX = (
    "You are a careful assistant for a railway company. Timetables, platform changes and "
    "delays are announced in the station and on the website; tickets bought online are valid "
    "on the day of travel only, and seat reservations close ten minutes before departure. "
)
QUESTIONS = [
    "Which platform does the morning train to the coast leave from?",
    "Can I use yesterday's online ticket today?",
    "When do seat reservations close?",
    "Where are delays announced?",
    "Is the timetable on the website up to date?",
    "What happens if my train is cancelled?",
]
LONG_UNSHARED = [
    f"Write two sentences about the history of the number {n}, mentioning why mathematicians "
    f"and engineers have found it interesting over the centuries, and one surprising fact."
    for n in (7, 12, 42, 99)
]
SHORT = ["Hi", "Name a colour.", "Say yes."]


@pytest.fixture(scope="module")
def stack():
    tmp = Path(tempfile.mkdtemp(prefix="tandem-dashboard-"))
    port, control_port = free_port(), free_port()
    endpoints = tmp / "endpoints.json"
    local = Process("tandem local", [
        tandem_bin(), "local", "--prefill", "1", "--decode", "1", "--port", str(port),
        "--remote-prefill-min-tokens", "16", "--endpoints-file", str(endpoints),
        "--control-port", str(control_port),
    ])
    processes = [local]
    try:
        base = f"http://127.0.0.1:{port}"

        def ready():
            local.alive()
            try:
                if requests.get(f"{base}/health", timeout=2).status_code != 200:
                    return None
            except requests.ConnectionError:
                return None
            procs = json.loads(endpoints.read_text())["processes"] if endpoints.exists() else []
            return procs if len(procs) == 3 and all(p["up"] for p in procs) else None

        procs = wait_for("tandem local to be ready", ready, 180, local.tail)
        # One static target per process, labelled as the Kubernetes relabelling labels a pod
        # of a DisaggDeployment named DEPLOYMENT (pods <deployment>-<tier>-<index>).
        static = [
            {"targets": [p["http"]], "labels": {
                "namespace": NAMESPACE, "deployment": DEPLOYMENT, "tier": p["role"],
                "pod": f"{DEPLOYMENT}-{p['role']}-{p['index']}"}}
            for p in procs
        ]
        planner_port = free_port()
        prometheus = Prometheus({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "tandem", "static_configs": static},
                # The planner's series name their deployment themselves (as the operator's
                # ServiceMonitor keeps them: honorLabels).
                {"job_name": "planner", "honor_labels": True,
                 "static_configs": [{"targets": [f"127.0.0.1:{planner_port}"]}]},
            ],
        })
        processes.append(prometheus)
        prom, query = prometheus.url, prometheus.query

        wait_for("every target scraped", lambda: len(query(f'up{{namespace="{NAMESPACE}"}} == 1')) == 3, 30,
                 prometheus.tail)
        planner = Process("planner-local", [
            planner_local_bin(), "--prometheus", prom, "--control", f"http://127.0.0.1:{control_port}",
            "--namespace", NAMESPACE, "--deployment", DEPLOYMENT, "--ttft-p90-ms", "2000",
            "--itl-p90-ms", "200", "--interval-secs", "1", "--window-secs", "5",
            "--prefill-max", "1", "--decode-max", "1", "--metrics-port", str(planner_port),
        ])
        processes.append(planner)
        wait_for("the planner scraped", lambda: planner.alive() and query('up{job="planner"} == 1'), 30,
                 planner.tail)
        yield {"base": base, "prom": prom, "query": query, "tail": lambda: local.tail() + prometheus.tail()}
    finally:
        for p in reversed(processes):
            p.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded(stack):
    """Sends the load, then waits until Prometheus has scraped its end and evaluated the rules."""
    import openai

    client = openai.OpenAI(base_url=f"{stack['base']}/v1", api_key="not-needed", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    prompts = [SHARED_PREFIX + q for q in QUESTIONS] + LONG_UNSHARED + SHORT

    def chat(prompt):
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12,
            temperature=0, stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    # The first shared-prefix request alone, so the others find its prefix cached.
    assert chat(prompts[0])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(chat, prompts[1:]))
    assert all(answers), answers
    # A counter's rate needs two different samples: a series born in the burst above may have
    # taken all its increments within one scrape. One more of each kind, a few scrapes later.
    time.sleep(2.5)
    tail = [SHARED_PREFIX + "Summarise the rules above in one line.", LONG_UNSHARED[0] + " Be brief.", SHORT[0]]
    for prompt in tail:
        assert chat(prompt)
    sent = len(prompts) + len(tail)
    q = stack["query"]
    sel = f'namespace="{NAMESPACE}",deployment="{DEPLOYMENT}"'
    wait_for(
        f"Prometheus to see all {sent} requests",
        lambda: (r := q(f"sum(tandem_frontend_requests_total{{{sel}}})")) and float(r[0]["value"][1]) == sent,
        30, stack["tail"],
    )
    wait_for("the recording rules", lambda: q(f"tandem:ttft_slow_requests:ratio_rate5m{{{sel}}}"), 30, stack["tail"])
    # A planner step that read this load's p90s (steps before the first request find no series).
    wait_for("the planner to read the load", lambda: q(f"tandem_planner_observed_p90_seconds{{{sel}}}")
             and q(f'tandem_planner_decisions_total{{{sel},reason="hold"}}'), 30, stack["tail"])
    return {**stack, "model": model, "sent": sent}


def dashboard():
    return json.loads(DASHBOARD.read_text())


def targets():
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["refId"], target["expr"]


def substitute(expr, values):
    def one(m):
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"unknown variable ${name} in {expr}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def grafana_regex_escape(value):
    """A variable's value as Grafana puts it into a PromQL `=~` matcher: regex metacharacters
    escaped, the backslash doubled for the PromQL string."""
    return re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\\\1", value)


def variable_values(model):
    """Each dashboard variable as a user picking one namespace, deployment and model sets it
    (model=None: "All", which the dashboard sends as its allValue)."""
    values = dict(BUILTINS)
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "textbox":
            values[v["name"]] = v["query"]
        elif v["type"] == "query":
            values[v["name"]] = {"namespace": NAMESPACE, "deployment": DEPLOYMENT,
                                 "model": grafana_regex_escape(model) if model else v["allValue"]}[v["name"]]
    return values


def finite(result):
    return [s for s in result if not math.isnan(float(s["value"][1]))]


def test_the_dashboard_is_a_grafana_dashboard():
    d = dashboard()
    assert d["uid"] == "tandem" and d["schemaVersion"] >= 36
    names = [v["name"] for v in d["templating"]["list"]]
    assert names[:4] == ["datasource", "namespace", "deployment", "model"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    listed = set(NOT_HERE)
    assert listed <= {(t, r) for t, r, _ in targets()}, "NOT_HERE names a target the dashboard lacks"


@pytest.mark.parametrize("model_choice", ["all", "one"])
def test_every_panel_query_returns_series(loaded, model_choice):
    values = variable_values(loaded["model"] if model_choice == "one" else None)
    empty, checked = [], 0
    for title, ref, expr in targets():
        query = substitute(expr, values)
        result = loaded["query"](query)
        if (title, ref) in NOT_HERE:
            assert not result, f"{title} [{ref}] has series here, drop it from NOT_HERE: {query}"
            continue
        checked += 1
        if not finite(result):
            empty.append(f"{title} [{ref}]: {query} -> {result}")
    hint = ("\n(with one model selected, worker and KV-transfer panels need those series to carry the "
            "`model` label, as the frontend's do; a tandem binary from before that fails here)")
    assert not empty, "queries without a series (or only NaN):\n" + "\n".join(empty) + hint
    assert checked >= 20


def test_variables_offer_the_deployment(loaded):
    """The namespace, deployment and model pickers list what is being served."""
    expected = {"namespace": NAMESPACE, "deployment": DEPLOYMENT, "model": loaded["model"]}
    values = variable_values(None)
    for v in dashboard()["templating"]["list"]:
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", v["query"]["query"])
        assert m, v["query"]
        selector, label = substitute(m.group(1), values), m.group(2)
        r = requests.get(f"{loaded['prom']}/api/v1/label/{label}/values", params={"match[]": selector}, timeout=10)
        assert expected[v["name"]] in r.json()["data"], (v["name"], r.json())


def series_by(loaded, title, ref, label):
    expr = next(e for t, r, e in targets() if (t, r) == (title, ref))
    result = loaded["query"](substitute(expr, variable_values(loaded["model"])))
    return {s["metric"].get(label): float(s["value"][1]) for s in result}


def test_panels_show_what_the_load_did(loaded):
    """What a user reads off the panels after this load: both kinds of prefill, KV sent by
    prefill and received by decode over gRPC at the same rate, prefix-cache hits on decode,
    and three scraped replicas, one per tier."""
    prefills = series_by(loaded, "Prefills: remote vs local", "A", "location")
    assert prefills.get("remote", 0) > 0 and prefills.get("local", 0) > 0, prefills
    kv = {}
    for s in loaded["query"](substitute(
            next(e for t, r, e in targets() if t == "KV transfer bytes by transport"), variable_values(loaded["model"]))):
        kv[(s["metric"]["transport"], s["metric"]["direction"])] = float(s["value"][1])
    assert kv.get(("grpc", "sent"), 0) > 0 and kv.get(("grpc", "received"), 0) > 0, kv
    # Rates of two processes scraped at different instants differ a little; the totals do not.
    totals = {s["metric"]["direction"]: float(s["value"][1]) for s in loaded["query"](
        f'sum by (direction) (tandem_kv_transfer_bytes_total{{namespace="{NAMESPACE}",transport="grpc"}})')}
    assert totals["sent"] == totals["received"] > 0, totals
    hits = series_by(loaded, "Prefix-cache hit rate", "A", "tier")
    assert 0 < hits.get("decode", 0) < 1, hits
    scraped = series_by(loaded, "Replicas per tier: desired, scraped, ready", "B", "tier")
    assert scraped == {"frontend": 1, "prefill": 1, "decode": 1}, scraped
    statuses = series_by(loaded, "Requests by status", "A", "status")
    assert set(statuses) == {"ok"} and statuses["ok"] > 0, statuses
