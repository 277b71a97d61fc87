"""Tracing end to end: `tandem local` (a frontend, a prefill and a decode worker) exporting
spans over OTLP/HTTP to a real receiver, JSON logs, and the official `openai` client sending
`traceparent` and `x-request-id`; `tandem serve` exporting over OTLP/HTTP and OTLP/gRPC
(docs/tracing.md).

The receivers decode OTLP with the OpenTelemetry project's own generated classes
(`opentelemetry-proto`): a stdlib HTTP server for OTLP/HTTP, a `grpcio` server for OTLP/gRPC."""
import json
import os
import secrets
import signal
import subprocess
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import openai
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from conftest import READY_TIMEOUT_S, free_port, tandem_bin

# Clocks of the processes are the same machine's; the frontend reads its phase boundaries
# where events arrive, a little after the worker that sent them: allow this much skew.
SLACK_NS = 20_000_000


class Receiver:
    """An OTLP trace receiver: every span of every export, flattened. OTLP/HTTP
    (`http/protobuf`) or OTLP/gRPC (`grpc`)."""

    def __init__(self, protocol="http/protobuf"):
        self.spans = []
        self.lock = threading.Lock()
        if protocol == "grpc":
            self._start_grpc()
        else:
            self._start_http()

    def _start_http(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                if ok:
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.close = server.shutdown

    def _start_grpc(self):
        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                receiver.add(request)
                return ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.close = lambda: server.stop(grace=None)

    def add(self, export):
        flat = []
        for rs in export.resource_spans:
            resource = {a.key: a.value.string_value for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    flat.append({
                        "service": resource.get("service.name"),
                        "name": s.name,
                        "kind": s.kind,
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent": s.parent_span_id.hex(),
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: a.value for a in s.attributes},
                    })
        with self.lock:
            self.spans.extend(flat)

    def trace(self, trace_id):
        with self.lock:
            return [s for s in self.spans if s["trace_id"] == trace_id]

    def wait_for(self, trace_id, done, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if done(spans):
                return spans
            time.sleep(0.2)
        return self.trace(trace_id)


@pytest.fixture(scope="module")
def deployment():
    receiver = Receiver()
    logs = tempfile.TemporaryDirectory()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update({
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        # Export within a fraction of a second instead of the default 5 s.
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    })
    proc = subprocess.Popen(
        [tandem_bin(), "local", "--prefill", "1", "--decode", "1", "--port", str(port),
         "--remote-prefill-min-tokens", "16", "--log-format", "json", "--log-dir", logs.name],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        assert proc.poll() is None, f"tandem local exited with {proc.returncode}"
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "tandem local not ready"
        time.sleep(0.2)
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=300)
    yield {"receiver": receiver, "logs": Path(logs.name), "base": base, "client": client,
           "model": client.models.list().data[0].id}
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    receiver.close()
    logs.cleanup()


def long_question():
    """A prompt of well over 16 tokens that no earlier request shares: prefilled remotely."""
    words = " ".join(secrets.token_hex(3) for _ in range(24))
    return [{"role": "user", "content": f"Repeat these words back to me, in order: {words}"}]


def ask(d, headers, **kw):
    raw = d["client"].chat.completions.with_raw_response.create(
        model=d["model"], messages=long_question(), temperature=0, max_tokens=6,
        extra_headers=headers, **kw)
    return raw


def complete(spans):
    services = {s["service"] for s in spans}
    names = {(s["service"], s["name"]) for s in spans}
    return services >= {"tandem-frontend", "tandem-decode", "tandem-prefill"} and {
        ("tandem-frontend", "POST /v1/chat/completions"),
        ("tandem-decode", "decode"),
        ("tandem-prefill", "kv_transfer"),
        ("tandem-decode", "kv_transfer"),
    } <= names


def one(spans, service, name):
    found = [s for s in spans if s["service"] == service and s["name"] == name]
    assert len(found) == 1, f"{service} {name}: {len(found)} spans in {[(s['service'], s['name']) for s in spans]}"
    return found[0]


def within(child, parent):
    assert child["start"] <= child["end"], f"{child['name']} ends before it starts"
    assert parent["start"] - SLACK_NS <= child["start"], f"{child['name']} starts before {parent['name']}"
    assert child["end"] <= parent["end"] + SLACK_NS, f"{child['name']} ends after {parent['name']}"


def test_one_trace_across_frontend_decode_and_prefill_with_the_phases(deployment):
    d = deployment
    trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
    request_id = f"trace-test-{secrets.token_hex(4)}"
    raw = ask(d, {"traceparent": f"00-{trace_id}-{caller}-01", "x-request-id": request_id})
    assert raw.headers["x-request-id"] == request_id
    answer = raw.parse()
    assert answer.id.startswith("chatcmpl-"), "the OpenAI id stays the server's own"
    assert answer.usage.completion_tokens > 0

    spans = d["receiver"].wait_for(trace_id, complete)
    assert complete(spans), [(s["service"], s["name"]) for s in spans]

    # The frontend: a server span under the caller's, routing, then the call to decode.
    server = one(spans, "tandem-frontend", "POST /v1/chat/completions")
    assert server["parent"] == caller
    assert server["kind"] == PbSpan.SPAN_KIND_SERVER
    assert server["attributes"]["request_id"].string_value == request_id
    assert server["attributes"]["http.response.status_code"].int_value == 200
    route = one(spans, "tandem-frontend", "route")
    to_decode = one(spans, "tandem-frontend", "tandem.Decode/Generate")
    assert route["parent"] == server["span_id"] and to_decode["parent"] == server["span_id"]
    assert to_decode["kind"] == PbSpan.SPAN_KIND_CLIENT
    assert route["end"] <= to_decode["start"] + SLACK_NS

    # The decode worker: its server span under the frontend's call; the KV arrives under its
    # call to the prefill worker, then it decodes.
    at_decode = one(spans, "tandem-decode", "tandem.Decode/Generate")
    assert at_decode["parent"] == to_decode["span_id"]
    assert at_decode["kind"] == PbSpan.SPAN_KIND_SERVER
    assert at_decode["attributes"]["request_id"].string_value == request_id
    to_prefill = one(spans, "tandem-decode", "tandem.Prefill/Prefill")
    assert to_prefill["parent"] == at_decode["span_id"]
    received = one(spans, "tandem-decode", "kv_transfer")
    assert received["parent"] == to_prefill["span_id"]
    assert received["attributes"]["tandem.kv.direction"].string_value == "received"
    assert received["attributes"]["tandem.kv.bytes"].int_value > 0
    decode = one(spans, "tandem-decode", "decode")
    assert decode["parent"] == at_decode["span_id"]
    assert decode["attributes"]["tandem.completion_tokens"].int_value == answer.usage.completion_tokens
    # Prefilled elsewhere: the decode worker records no queue or prefill of its own.
    assert not [s for s in spans if s["service"] == "tandem-decode" and s["name"] in ("queue", "prefill")]

    # The prefill worker: queued, prefilled, and the KV sent, under the decode worker's call.
    at_prefill = one(spans, "tandem-prefill", "tandem.Prefill/Prefill")
    assert at_prefill["parent"] == to_prefill["span_id"]
    queue = one(spans, "tandem-prefill", "queue")
    prefill = one(spans, "tandem-prefill", "prefill")
    sent = one(spans, "tandem-prefill", "kv_transfer")
    for phase in (queue, prefill, sent):
        assert phase["parent"] == at_prefill["span_id"]
        within(phase, at_prefill)
    assert queue["end"] <= prefill["start"]
    assert prefill["attributes"]["tandem.prompt_tokens"].int_value >= 16
    assert sent["attributes"]["tandem.kv.bytes"].int_value == received["attributes"]["tandem.kv.bytes"].int_value

    # Every span lies within the request's, and phases follow each other.
    for s in spans:
        if s is not server:
            within(s, server)
    within(route, server)
    within(at_decode, to_decode)
    within(to_prefill, at_decode)
    within(at_prefill, to_prefill)
    within(received, to_prefill)
    within(decode, at_decode)
    assert to_prefill["end"] <= decode["start"] + SLACK_NS, "decoding starts once the KV is in"

    # Every role logged about the request, as JSON, with its request id.
    for role in ("frontend-0", "decode-0", "prefill-0"):
        lines = [json.loads(l) for l in (d["logs"] / f"{role}.log").read_text().splitlines() if l.startswith("{")]
        assert lines, f"{role} wrote no JSON log lines"
        mine = [l for l in lines if any(s.get("request_id") == request_id for s in l.get("spans", []))]
        assert mine, f"{role}'s log has no line with request_id {request_id}"
        assert all({"timestamp", "level", "fields"} <= l.keys() for l in mine)


def test_a_request_without_traceparent_starts_a_trace_and_gets_a_request_id(deployment):
    d = deployment
    raw = ask(d, {})
    request_id = raw.headers["x-request-id"]
    assert len(request_id) == 32 and int(request_id, 16) >= 0
    raw.parse()
    deadline = time.monotonic() + 30
    server = None
    while server is None and time.monotonic() < deadline:
        with d["receiver"].lock:
            found = [s for s in d["receiver"].spans if s["name"] == "POST /v1/chat/completions"
                     and s["attributes"]["request_id"].string_value == request_id]
        server = found[0] if found else None
        time.sleep(0.2)
    assert server is not None, "no frontend span for the request"
    assert server["parent"] == "", "a new trace: the frontend's span is its root"
    spans = d["receiver"].wait_for(server["trace_id"], complete)
    assert complete(spans)


def test_an_unsampled_traceparent_is_respected_and_ids_are_echoed_on_errors_and_streams(deployment):
    d = deployment
    unsampled = secrets.token_hex(16)
    raw = ask(d, {"traceparent": f"00-{unsampled}-{secrets.token_hex(8)}-00", "x-request-id": "no-trace-1"})
    assert raw.headers["x-request-id"] == "no-trace-1"
    raw.parse()

    # A stream echoes it in its headers; an error too; a malformed id is replaced.
    stream_id = f"stream-{secrets.token_hex(4)}"
    with requests.post(f"{d['base']}/v1/chat/completions", stream=True, timeout=300,
                       headers={"x-request-id": stream_id},
                       json={"model": d["model"], "messages": long_question(), "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-request-id"] == stream_id
        assert b"[DONE]" in r.content
    bad = requests.post(f"{d['base']}/v1/chat/completions", timeout=30,
                        headers={"x-request-id": "err-1"}, json={"model": "no-such-model", "messages": []})
    assert bad.status_code >= 400 and bad.headers["x-request-id"] == "err-1"
    forged = requests.post(f"{d['base']}/v1/chat/completions", timeout=30,
                           headers={"x-request-id": 'x" injected'}, json={})
    assert forged.headers["x-request-id"] != 'x" injected' and len(forged.headers["x-request-id"]) == 32

    # A sampled request sent after it is exported; the unsampled one never is.
    later = secrets.token_hex(16)
    ask(d, {"traceparent": f"00-{later}-{secrets.token_hex(8)}-01"}).parse()
    assert complete(d["receiver"].wait_for(later, complete))
    time.sleep(1)
    assert d["receiver"].trace(unsampled) == []


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_serve_records_the_engine_phases_and_logs_the_request_id_as_text(protocol):
    receiver = Receiver(protocol)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "TANDEM_LOG_FORMAT"}
    env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200",
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([tandem_bin(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + READY_TIMEOUT_S
            while True:
                assert proc.poll() is None, f"tandem serve exited with {proc.returncode}"
                try:
                    if requests.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                assert time.monotonic() < deadline, "tandem serve not ready"
                time.sleep(0.2)
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="not-needed", max_retries=0, timeout=300)
            trace_id, caller = secrets.token_hex(16), secrets.token_hex(8)
            raw = client.completions.with_raw_response.create(
                model="default", prompt="The capital of France is", max_tokens=5, temperature=0,
                extra_headers={"traceparent": f"00-{trace_id}-{caller}-01", "x-request-id": "serve-1"})
            assert raw.headers["x-request-id"] == "serve-1"
            tokens = raw.parse().usage.completion_tokens
            names = {"POST /v1/completions", "queue", "prefill", "decode"}
            spans = receiver.wait_for(trace_id, lambda s: names <= {x["name"] for x in s})
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            receiver.close()
        log.seek(0)
        text = log.read()
    assert {s["service"] for s in spans} == {"tandem-serve"}
    server = one(spans, "tandem-serve", "POST /v1/completions")
    assert server["parent"] == caller
    queue, prefill, decode = (one(spans, "tandem-serve", n) for n in ("queue", "prefill", "decode"))
    for phase in (queue, prefill, decode):
        assert phase["parent"] == server["span_id"]
        within(phase, server)
    assert queue["end"] <= prefill["start"] and prefill["end"] <= decode["start"]
    assert decode["attributes"]["tandem.completion_tokens"].int_value == tokens
    assert not [s for s in spans if s["name"] in ("route", "kv_transfer")]
    # Text logs: the request span's fields before the message.
    finished = [l for l in text.splitlines() if "request finished" in l]
    assert finished, text[-2000:]
    assert 'request_id="serve-1"' in finished[-1] or "request_id=serve-1" in finished[-1], finished
