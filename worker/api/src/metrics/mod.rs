//! The Prometheus metrics listed in docs/metrics.md, in one registry.
//!
//! Every role exposes the same registry on `/metrics`; a role only moves the
//! series it owns (the frontend ones in the HTTP layer, the worker ones in the
//! engine). Worker series carry the `role` label; at render time every series without a
//! `model` label gets the served model's (see [`compat`], which also exports peers' names).

use std::sync::{OnceLock, RwLock};

pub mod compat;

pub use compat::{Compat, Exposition, MODEL_LABEL};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every series' name, for the code that queries them (the operator's planner) as well as
/// the registry below.
pub mod names {
    pub const FRONTEND_REQUESTS_TOTAL: &str = "tandem_frontend_requests_total";
    pub const FRONTEND_TIME_TO_FIRST_TOKEN_SECONDS: &str =
        "tandem_frontend_time_to_first_token_seconds";
    pub const FRONTEND_INTER_TOKEN_LATENCY_SECONDS: &str =
        "tandem_frontend_inter_token_latency_seconds";
    pub const FRONTEND_REQUEST_DURATION_SECONDS: &str = "tandem_frontend_request_duration_seconds";
    pub const FRONTEND_INPUT_TOKENS: &str = "tandem_frontend_input_tokens";
    pub const FRONTEND_OUTPUT_TOKENS: &str = "tandem_frontend_output_tokens";
    pub const FRONTEND_INFLIGHT_REQUESTS: &str = "tandem_frontend_inflight_requests";
    pub const WORKER_QUEUE_DEPTH: &str = "tandem_worker_queue_depth";
    pub const WORKER_RUNNING_SEQUENCES: &str = "tandem_worker_running_sequences";
    pub const WORKER_KV_BLOCKS_USED: &str = "tandem_worker_kv_blocks_used";
    pub const WORKER_KV_BLOCKS_TOTAL: &str = "tandem_worker_kv_blocks_total";
    pub const WORKER_PREFIX_CACHE_HITS_TOTAL: &str = "tandem_worker_prefix_cache_hits_total";
    pub const WORKER_PREFILL_TOKENS_TOTAL: &str = "tandem_worker_prefill_tokens_total";
    pub const WORKER_DECODE_TOKENS_TOTAL: &str = "tandem_worker_decode_tokens_total";
    pub const WORKER_PREEMPTIONS_TOTAL: &str = "tandem_worker_preemptions_total";
    pub const KV_TRANSFER_BYTES_TOTAL: &str = "tandem_kv_transfer_bytes_total";
    pub const KV_TRANSFER_SECONDS: &str = "tandem_kv_transfer_seconds";
    pub const WORKER_PREFILLS_TOTAL: &str = "tandem_worker_prefills_total";
    pub const WORKER_REMOTE_PREFILL_TOKENS_TOTAL: &str =
        "tandem_worker_remote_prefill_tokens_total";
    pub const WORKER_REMOTE_PREFILL_FAILURES_TOTAL: &str =
        "tandem_worker_remote_prefill_failures_total";
    pub const FRONTEND_MIGRATIONS_TOTAL: &str = "tandem_frontend_migrations_total";
    pub const WORKER_REQUEST_QUEUE_SECONDS: &str = "tandem_worker_request_queue_seconds";
    pub const WORKER_REQUEST_PREFILL_SECONDS: &str = "tandem_worker_request_prefill_seconds";
    pub const WORKER_REQUEST_DECODE_SECONDS: &str = "tandem_worker_request_decode_seconds";
}

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
    pub request_queue_seconds: HistogramVec,
    pub request_prefill_seconds: HistogramVec,
    pub request_decode_seconds: HistogramVec,
    // KV transfer (disaggregation).
    pub kv_transfer_bytes: IntCounterVec,
    pub kv_transfer_seconds: HistogramVec,
    pub prefills: IntCounterVec,
    pub remote_prefill_tokens: IntCounterVec,
    pub remote_prefill_failures: IntCounterVec,
    pub migrations: IntCounterVec,
    /// How `/metrics` renders the registry (model label, peers' names).
    exposition: RwLock<Exposition>,
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
                names::FRONTEND_REQUESTS_TOTAL,
                "Requests answered, by model and outcome (ok, client_error, overloaded, server_error, cancelled).",
                &["model", "status"],
            ),
            time_to_first_token: hist(
                names::FRONTEND_TIME_TO_FIRST_TOKEN_SECONDS,
                "Time from request arrival to the first generated token.",
                latency_buckets(),
                &["model"],
            ),
            inter_token_latency: hist(
                names::FRONTEND_INTER_TOKEN_LATENCY_SECONDS,
                "Time between consecutive generated tokens of one request.",
                latency_buckets(),
                &["model"],
            ),
            request_duration: hist(
                names::FRONTEND_REQUEST_DURATION_SECONDS,
                "Time from request arrival to its last byte.",
                latency_buckets(),
                &["model"],
            ),
            input_tokens: hist(
                names::FRONTEND_INPUT_TOKENS,
                "Prompt length of each request, in tokens.",
                token_buckets(),
                &["model"],
            ),
            output_tokens: hist(
                names::FRONTEND_OUTPUT_TOKENS,
                "Generated length of each request, in tokens.",
                token_buckets(),
                &["model"],
            ),
            inflight_requests: gauge(
                names::FRONTEND_INFLIGHT_REQUESTS,
                "Requests admitted and not yet finished.",
                &["model"],
            ),
            queue_depth: gauge(
                names::WORKER_QUEUE_DEPTH,
                "Requests waiting for admission into the running batch.",
                &["role"],
            ),
            running_sequences: gauge(
                names::WORKER_RUNNING_SEQUENCES,
                "Sequences in the running batch.",
                &["role"],
            ),
            kv_blocks_used: gauge(
                names::WORKER_KV_BLOCKS_USED,
                "KV cache blocks referenced by running sequences.",
                &["role"],
            ),
            kv_blocks_total: gauge(
                names::WORKER_KV_BLOCKS_TOTAL,
                "KV cache blocks in the pool.",
                &["role"],
            ),
            prefix_cache_hits: counter(
                names::WORKER_PREFIX_CACHE_HITS_TOTAL,
                "Prompt tokens served from the prefix cache instead of computed.",
                &["role"],
            ),
            prefill_tokens: counter(
                names::WORKER_PREFILL_TOKENS_TOTAL,
                "Prompt tokens computed.",
                &["role"],
            ),
            decode_tokens: counter(
                names::WORKER_DECODE_TOKENS_TOTAL,
                "Tokens generated.",
                &["role"],
            ),
            preemptions: counter(
                names::WORKER_PREEMPTIONS_TOTAL,
                "Sequences preempted (to be recomputed) because KV blocks ran out.",
                &["role"],
            ),
            request_queue_seconds: hist(
                names::WORKER_REQUEST_QUEUE_SECONDS,
                "Time a request waited in this engine's queue before its first admission into the batch.",
                latency_buckets(),
                &["role"],
            ),
            request_prefill_seconds: hist(
                names::WORKER_REQUEST_PREFILL_SECONDS,
                "Time from a request's admission to its first token on the engine that computed its prompt.",
                latency_buckets(),
                &["role"],
            ),
            request_decode_seconds: hist(
                names::WORKER_REQUEST_DECODE_SECONDS,
                "Time from a request's first token to its last on the engine that generated it.",
                latency_buckets(),
                &["role"],
            ),
            kv_transfer_bytes: counter(
                names::KV_TRANSFER_BYTES_TOTAL,
                "KV cache bytes shipped between prefill and decode, by direction (sent, received) and transport (grpc, cuda-ipc).",
                &["role", "direction", "transport"],
            ),
            kv_transfer_seconds: hist(
                names::KV_TRANSFER_SECONDS,
                "Duration of one prompt's KV transfer (cuda-ipc sender: the GPU copy).",
                latency_buckets(),
                &["role", "direction", "transport"],
            ),
            prefills: counter(
                names::WORKER_PREFILLS_TOTAL,
                "Prompts a decode worker had prefilled, by location (remote: on a prefill worker; local: by its own engine).",
                &["role", "location"],
            ),
            remote_prefill_tokens: counter(
                names::WORKER_REMOTE_PREFILL_TOKENS_TOTAL,
                "Prompt tokens whose KV a decode worker received from prefill workers.",
                &["role"],
            ),
            remote_prefill_failures: counter(
                names::WORKER_REMOTE_PREFILL_FAILURES_TOTAL,
                "Remote prefill attempts that failed or stalled (the prompt was then prefilled elsewhere).",
                &["role"],
            ),
            migrations: counter(
                names::FRONTEND_MIGRATIONS_TOTAL,
                "Requests re-issued to another decode worker after theirs failed mid-request.",
                &["model"],
            ),
            registry,
            exposition: RwLock::new(Exposition::default()),
        }
    }

    /// Sets how `/metrics` renders: the served model's name as the `model` label of every
    /// series that has none, and the peers whose names are exported too.
    pub fn set_exposition(&self, exposition: Exposition) {
        *self.exposition.write().unwrap_or_else(|e| e.into_inner()) = exposition;
    }

    /// Prometheus text exposition of every series.
    pub fn render(&self) -> String {
        let families = self
            .exposition
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .apply(self.registry.gather());
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&families, &mut buf)
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
