"""A dashboard written for vLLM or Dynamo works unmodified on Tandem started with
`--metrics-compat vllm,dynamo`.

`tandem serve` (the binary in $TANDEM_BIN) serves with that flag; the Debian `prometheus` on
loopback scrapes it every second; the official `openai` client sends a short load. Then the
queries of vLLM's example Grafana dashboard (examples/online_serving/prometheus_grafana/
grafana.json in the vLLM repository: its panel expressions and its `model_name` variable, as
Grafana would send them) and the Dynamo frontend's usual queries run on /api/v1/query and must
return series. docs/metrics.md lists the mapping; the one vLLM series Tandem has no measurement
for is listed below and must stay absent (so the list cannot outlive its reason)."""
import math
import subprocess
import tempfile
import time

import pytest
import requests

from conftest import Prometheus, free_port, tandem_bin, wait_for

# The panel expressions of vLLM's example dashboard; $model_name and $__rate_interval are
# Grafana's variables, substituted below.
VLLM_DASHBOARD = [
    'histogram_quantile(0.99, sum by(le) (rate(vllm:e2e_request_latency_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:e2e_request_latency_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\nrate(vllm:e2e_request_latency_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:prompt_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:generation_tokens_total{model_name="$model_name"}[$__rate_interval])',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_per_output_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:time_per_output_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\nrate(vllm:time_per_output_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:num_requests_running{model_name="$model_name"}',
    'vllm:num_requests_waiting{model_name="$model_name"}',
    'histogram_quantile(0.99, sum by(le) (rate(vllm:time_to_first_token_seconds_bucket{model_name="$model_name"}[$__rate_interval])))',
    'rate(vllm:time_to_first_token_seconds_sum{model_name="$model_name"}[$__rate_interval])\n/\nrate(vllm:time_to_first_token_seconds_count{model_name="$model_name"}[$__rate_interval])',
    'vllm:gpu_cache_usage_perc{model_name="$model_name"}',
    'sum by(le) (increase(vllm:request_prompt_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(le) (increase(vllm:request_generation_tokens_bucket{model_name="$model_name"}[$__rate_interval]))',
    'sum by(finished_reason) (increase(vllm:request_success_total{model_name="$model_name"}[$__rate_interval]))',
    'rate(vllm:request_queue_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_prefill_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_decode_time_seconds_sum{model_name="$model_name"}[$__rate_interval])',
    'rate(vllm:request_max_num_generation_tokens_sum{model_name="$model_name"}[$__rate_interval])',
]
# The dashboard's variable: the models it offers.
VLLM_MODEL_VARIABLE = '{__name__=~"vllm:.*"}'
# vLLM series Tandem does not export, and why.
NOT_EXPORTED = {
    "vllm:request_max_num_generation_tokens": "the requested max_tokens per request is not measured",
}

DYNAMO_QUERIES = [
    'histogram_quantile(0.9, sum by(le) (rate(dynamo_frontend_time_to_first_token_seconds_bucket{model="$model"}[$__rate_interval])))',
    'histogram_quantile(0.9, sum by(le) (rate(dynamo_frontend_inter_token_latency_seconds_bucket{model="$model"}[$__rate_interval])))',
    'histogram_quantile(0.9, sum by(le) (rate(dynamo_frontend_request_duration_seconds_bucket{model="$model"}[$__rate_interval])))',
    'sum by (status) (rate(dynamo_frontend_requests_total{model="$model"}[$__rate_interval]))',
    'dynamo_frontend_inflight_requests{model="$model"}',
    'rate(dynamo_frontend_input_sequence_tokens_sum{model="$model"}[$__rate_interval]) / rate(dynamo_frontend_input_sequence_tokens_count{model="$model"}[$__rate_interval])',
    'rate(dynamo_frontend_output_sequence_tokens_sum{model="$model"}[$__rate_interval])',
    'dynamo_component_kvstats_gpu_cache_usage_percent{model="$model"}',
    'dynamo_component_kvstats_active_blocks{model="$model"} / dynamo_component_kvstats_total_blocks{model="$model"}',
]

RATE_INTERVAL = "1m"


@pytest.fixture(scope="module")
def scraped():
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    serve = subprocess.Popen([tandem_bin(), "serve", "--port", str(port), "--metrics-compat", "vllm,dynamo"],
                             stdout=log, stderr=subprocess.STDOUT)
    prometheus = None

    def tail():
        log.flush()
        log.seek(0)
        return "".join(log.readlines()[-40:])

    try:
        base = f"http://127.0.0.1:{port}"

        def healthy():
            if serve.poll() is not None:
                pytest.fail(f"tandem serve exited with {serve.returncode}\n{tail()}")
            try:
                return requests.get(f"{base}/health", timeout=2).status_code == 200
            except requests.ConnectionError:
                return False

        wait_for("tandem serve", healthy, 180, tail)
        prometheus = Prometheus({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
        })
        query = prometheus.query
        wait_for("Prometheus scraping tandem serve", lambda: query('up{job="vllm"} == 1'), 60, prometheus.tail)

        import openai

        client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        prompts = ["Name a colour.", "Count to five.", "Say hello in French.", "What is two plus two?"]
        # Two rounds a few scrapes apart: a rate needs two samples that differ.
        for round_ in range(2):
            for p in prompts:
                stream = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": p}], max_tokens=8,
                    temperature=0, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            if round_ == 0:
                time.sleep(2.5)
        sent = 2 * len(prompts)
        wait_for(f"Prometheus to see {sent} requests",
                 lambda: (r := query("sum(vllm:request_success_total)")) and float(r[0]["value"][1]) == sent,
                 30, tail)
        yield {"prom": prometheus.url, "query": query, "model": model}
    finally:
        if prometheus:
            prometheus.stop()
        if serve.poll() is None:
            serve.terminate()
            try:
                serve.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve.kill()
        log.close()


def finite(result):
    return [s for s in result if not math.isnan(float(s["value"][1]))]


def test_vllm_dashboard_variable_offers_the_served_model(scraped):
    r = requests.get(f"{scraped['prom']}/api/v1/label/model_name/values",
                     params={"match[]": VLLM_MODEL_VARIABLE}, timeout=10)
    assert r.json()["data"] == [scraped["model"]], r.json()


def test_every_vllm_dashboard_query_returns_series(scraped):
    empty = []
    for expr in VLLM_DASHBOARD:
        q = expr.replace("$model_name", scraped["model"]).replace("$__rate_interval", RATE_INTERVAL)
        result = scraped["query"](q)
        if any(name in expr for name in NOT_EXPORTED):
            assert not result, f"{q} has series now: drop it from NOT_EXPORTED"
            continue
        if not finite(result):
            empty.append(f"{q} -> {result}")
    assert not empty, "vLLM dashboard queries without a series:\n" + "\n".join(empty)


def test_vllm_names_measure_what_the_tandem_names_do(scraped):
    """The same measurement under both names: a dashboard moved to Tandem reads true values."""
    q = scraped["query"]
    pairs = [
        ("vllm:request_success_total", 'tandem_frontend_requests_total{status="ok"}'),
        ("vllm:time_to_first_token_seconds_count", "tandem_frontend_time_to_first_token_seconds_count"),
        ("vllm:generation_tokens_total", "tandem_worker_decode_tokens_total"),
        ("vllm:e2e_request_latency_seconds_sum", "tandem_frontend_request_duration_seconds_sum"),
    ]
    for peer, ours in pairs:
        a, b = q(f"sum({peer})"), q(f"sum({ours})")
        assert a and b and float(a[0]["value"][1]) == float(b[0]["value"][1]) > 0, (peer, a, ours, b)
    usage = q("vllm:kv_cache_usage_perc")
    assert usage and all(0 <= float(s["value"][1]) <= 1 for s in usage), usage


def test_dynamo_frontend_queries_return_series(scraped):
    empty = []
    for expr in DYNAMO_QUERIES:
        q = expr.replace("$model", scraped["model"]).replace("$__rate_interval", RATE_INTERVAL)
        if not finite(scraped["query"](q)):
            empty.append(q)
    assert not empty, "Dynamo queries without a series:\n" + "\n".join(empty)
