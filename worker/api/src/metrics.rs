//! The Prometheus metrics listed in docs/metrics.md, in one registry.
//!
//! Every role exposes the same registry on `/metrics`; a role only moves the
//! series it owns (the frontend ones in the HTTP layer, the worker ones in the
//! engine). Worker series carry the `role` label.

use std::sync::OnceLock;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    // Frontend (the OpenAI HTTP layer).
    pub requests_total: IntCounterVec,
    pub time_to_first_token: HistogramVec,
    pub inter_token_latency: HistogramVec,
    pub request_duration: HistogramVec,
    pub input_tokens: HistogramVec,
    pub output_tokens: HistogramVec,
    pub inflight_requests: IntGaugeVec,
    // Workers (the engine), labelled by role.
    pub queue_depth: IntGaugeVec,
    pub running_sequences: IntGaugeVec,
    pub kv_blocks_used: IntGaugeVec,
    pub kv_blocks_total: IntGaugeVec,
    pub prefix_cache_hits: IntCounterVec,
    pub prefill_tokens: IntCounterVec,
    pub decode_tokens: IntCounterVec,
    pub preemptions: IntCounterVec,
    // KV transfer (disaggregation).
    pub kv_transfer_bytes: IntCounterVec,
    pub kv_transfer_seconds: HistogramVec,
    pub prefills: IntCounterVec,
    pub remote_prefill_tokens: IntCounterVec,
    pub remote_prefill_failures: IntCounterVec,
    pub migrations: IntCounterVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
        1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
    ]
}

fn token_buckets() -> Vec<f64> {
    vec![
        1.0, 4.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
        32768.0,
    ]
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let hist = |name: &str, help: &str, buckets: Vec<f64>, labels: &[&str]| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        Self {
            requests_total: counter(
                "tandem_frontend_requests_total",
                "Requests answered, by model and outcome (ok, client_error, overloaded, server_error, cancelled).",
                &["model", "status"],
            ),
            time_to_first_token: hist(
                "tandem_frontend_time_to_first_token_seconds",
                "Time from request arrival to the first generated token.",
                latency_buckets(),
                &["model"],
            ),
            inter_token_latency: hist(
                "tandem_frontend_inter_token_latency_seconds",
                "Time between consecutive generated tokens of one request.",
                latency_buckets(),
                &["model"],
            ),
            request_duration: hist(
                "tandem_frontend_request_duration_seconds",
                "Time from request arrival to its last byte.",
                latency_buckets(),
                &["model"],
            ),
            input_tokens: hist(
                "tandem_frontend_input_tokens",
                "Prompt length of each request, in tokens.",
                token_buckets(),
                &["model"],
            ),
            output_tokens: hist(
                "tandem_frontend_output_tokens",
                "Generated length of each request, in tokens.",
                token_buckets(),
                &["model"],
            ),
            inflight_requests: gauge(
                "tandem_frontend_inflight_requests",
                "Requests admitted and not yet finished.",
                &["model"],
            ),
            queue_depth: gauge(
                "tandem_worker_queue_depth",
                "Requests waiting for admission into the running batch.",
                &["role"],
            ),
            running_sequences: gauge(
                "tandem_worker_running_sequences",
                "Sequences in the running batch.",
                &["role"],
            ),
            kv_blocks_used: gauge(
                "tandem_worker_kv_blocks_used",
                "KV cache blocks referenced by running sequences.",
                &["role"],
            ),
            kv_blocks_total: gauge(
                "tandem_worker_kv_blocks_total",
                "KV cache blocks in the pool.",
                &["role"],
            ),
            prefix_cache_hits: counter(
                "tandem_worker_prefix_cache_hits_total",
                "Prompt tokens served from the prefix cache instead of computed.",
                &["role"],
            ),
            prefill_tokens: counter(
                "tandem_worker_prefill_tokens_total",
                "Prompt tokens computed.",
                &["role"],
            ),
            decode_tokens: counter(
                "tandem_worker_decode_tokens_total",
                "Tokens generated.",
                &["role"],
            ),
            preemptions: counter(
                "tandem_worker_preemptions_total",
                "Sequences preempted (to be recomputed) because KV blocks ran out.",
                &["role"],
            ),
            kv_transfer_bytes: counter(
                "tandem_kv_transfer_bytes_total",
                "KV cache bytes shipped between prefill and decode, by direction (sent, received) and transport (grpc, cuda-ipc).",
                &["role", "direction", "transport"],
            ),
            kv_transfer_seconds: hist(
                "tandem_kv_transfer_seconds",
                "Duration of one prompt's KV transfer (cuda-ipc sender: the GPU copy).",
                latency_buckets(),
                &["role", "direction", "transport"],
            ),
            prefills: counter(
                "tandem_worker_prefills_total",
                "Prompts a decode worker had prefilled, by location (remote: on a prefill worker; local: by its own engine).",
                &["role", "location"],
            ),
            remote_prefill_tokens: counter(
                "tandem_worker_remote_prefill_tokens_total",
                "Prompt tokens whose KV a decode worker received from prefill workers.",
                &["role"],
            ),
            remote_prefill_failures: counter(
                "tandem_worker_remote_prefill_failures_total",
                "Remote prefill attempts that failed or stalled (the prompt was then prefilled elsewhere).",
                &["role"],
            ),
            migrations: counter(
                "tandem_frontend_migrations_total",
                "Requests re-issued to another decode worker after theirs failed mid-request.",
                &["model"],
            ),
            registry,
        }
    }

    /// Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

// Keep single-series types importable for callers that pre-resolve labels.
pub type Gauge = IntGauge;
pub type Counter = IntCounter;
pub type Hist = Histogram;
