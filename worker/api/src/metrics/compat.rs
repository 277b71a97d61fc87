//! What `/metrics` adds to the registry's own series when it renders: the served model's
//! name as a `model` label on every series that lacks one, and, on request, the same
//! measurements under a peer's names (`--metrics-compat vllm,dynamo`) so a dashboard built
//! for vLLM or Dynamo works unmodified. docs/metrics.md has the mapping.
//!
//! Everything here works on gathered [`MetricFamily`] values: the registry and the hot paths
//! that move its series know nothing of it.

use std::collections::BTreeMap;

use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::names;

/// A peer whose metric names `/metrics` can export too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum)]
pub enum Compat {
    /// vLLM's `vllm:*` names, label `model_name`.
    Vllm,
    /// Dynamo's `dynamo_frontend_*` and `dynamo_component_kvstats_*` names, label `model`.
    Dynamo,
}

/// The label every series carries with the served model's name.
pub const MODEL_LABEL: &str = "model";
/// vLLM's name for it.
const VLLM_MODEL_LABEL: &str = "model_name";

/// How a process renders its registry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exposition {
    /// The served model's name; `None` until the process knows it (no label is added).
    pub model: Option<String>,
    /// Peers whose names are exported as well.
    pub compat: Vec<Compat>,
}

impl Exposition {
    /// The families to encode: `families` with the model label added, then each peer's.
    pub fn apply(&self, mut families: Vec<MetricFamily>) -> Vec<MetricFamily> {
        if let Some(model) = &self.model {
            for family in &mut families {
                add_missing_label(family, MODEL_LABEL, model);
            }
        }
        let mut extra = Vec::new();
        for compat in dedup(&self.compat) {
            extra.extend(match compat {
                Compat::Vllm => vllm(&families),
                Compat::Dynamo => dynamo(&families),
            });
        }
        // The encoder refuses a family without series (the registry never gathers one).
        families.extend(extra.into_iter().filter(|f| !f.get_metric().is_empty()));
        families
    }
}

fn dedup(compat: &[Compat]) -> Vec<Compat> {
    let mut out = Vec::new();
    for c in compat {
        if !out.contains(c) {
            out.push(*c);
        }
    }
    out
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_string());
    pair.set_value(value.to_string());
    pair
}

fn add_missing_label(family: &mut MetricFamily, name: &str, value: &str) {
    for metric in family.mut_metric() {
        if !metric.get_label().iter().any(|l| l.name() == name) {
            let mut labels = metric.take_label();
            labels.push(label(name, value));
            labels.sort_by(|a, b| a.name().cmp(b.name()));
            metric.set_label(labels);
        }
    }
}

fn find<'a>(families: &'a [MetricFamily], name: &str) -> Option<&'a MetricFamily> {
    families.iter().find(|f| f.name() == name)
}

/// A series' labels with `model` renamed to `model_label`, `drop` left out, sorted by name.
fn relabel(metric: &Metric, model_label: &str, drop: &[&str]) -> Vec<LabelPair> {
    let mut labels: Vec<LabelPair> = metric
        .get_label()
        .iter()
        .filter(|l| !drop.contains(&l.name()))
        .map(|l| {
            if l.name() == MODEL_LABEL {
                label(model_label, l.value())
            } else {
                l.clone()
            }
        })
        .collect();
    labels.sort_by(|a, b| a.name().cmp(b.name()));
    labels
}

fn family(name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(kind);
    f.set_metric(metrics);
    f
}

/// `source` under another name, its `model` label renamed; `None` when the registry has no
/// such family.
fn renamed(
    families: &[MetricFamily],
    source: &str,
    name: &str,
    model_label: &str,
) -> Option<MetricFamily> {
    let src = find(families, source)?;
    let metrics = src
        .get_metric()
        .iter()
        .map(|m| {
            let mut m = m.clone();
            let labels = relabel(&m, model_label, &[]);
            m.set_label(labels);
            m
        })
        .collect();
    Some(family(
        name,
        &format!("{} (as {source})", src.help()),
        src.get_field_type(),
        metrics,
    ))
}

/// Every family of `table` that the registry has, under its other name.
fn renamed_all(
    families: &[MetricFamily],
    table: &[(&str, &str)],
    model_label: &str,
) -> Vec<MetricFamily> {
    table
        .iter()
        .filter_map(|(source, name)| renamed(families, source, name, model_label))
        .collect()
}

/// The share of KV blocks in use, 0 to 1, per series, as the gauge `name`.
fn kv_usage(families: &[MetricFamily], name: &str, model_label: &str) -> MetricFamily {
    family(
        name,
        "Fraction of KV cache blocks in use, 0 to 1 (as tandem_worker_kv_blocks_used / tandem_worker_kv_blocks_total).",
        MetricType::GAUGE,
        ratio(
            families,
            names::WORKER_KV_BLOCKS_USED,
            names::WORKER_KV_BLOCKS_TOTAL,
            model_label,
        ),
    )
}

/// The numeric value of a counter or gauge series.
fn value(metric: &Metric, kind: MetricType) -> f64 {
    match kind {
        MetricType::COUNTER => metric.get_counter().get_value(),
        MetricType::GAUGE => metric.get_gauge().get_value(),
        _ => 0.0,
    }
}

/// Series of `source` keyed by their labels (renamed as in [`relabel`]), with their values.
fn values(
    families: &[MetricFamily],
    source: &str,
    model_label: &str,
) -> BTreeMap<Vec<(String, String)>, f64> {
    let mut out = BTreeMap::new();
    if let Some(f) = find(families, source) {
        for m in f.get_metric() {
            let key = relabel(m, model_label, &[])
                .into_iter()
                .map(|l| (l.name().to_string(), l.value().to_string()))
                .collect();
            out.insert(key, value(m, f.get_field_type()));
        }
    }
    out
}

fn metric_from(key: &[(String, String)], kind: MetricType, v: f64) -> Metric {
    let mut m = Metric::from_label(key.iter().map(|(n, v)| label(n, v)).collect());
    match kind {
        MetricType::COUNTER => {
            let mut c = Counter::default();
            c.set_value(v);
            m.set_counter(c);
        }
        _ => {
            let mut g = Gauge::default();
            g.set_value(v);
            m.set_gauge(g);
        }
    }
    m
}

/// `numerator / denominator` per label set present in both (0 where the denominator is 0).
fn ratio(
    families: &[MetricFamily],
    numerator: &str,
    denominator: &str,
    model_label: &str,
) -> Vec<Metric> {
    let num = values(families, numerator, model_label);
    let den = values(families, denominator, model_label);
    num.iter()
        .filter_map(|(key, n)| {
            let d = den.get(key)?;
            let v = if *d > 0.0 { n / d } else { 0.0 };
            Some(metric_from(key, MetricType::GAUGE, v))
        })
        .collect()
}

/// `a + b` per label set (a set present in one only counts as 0 in the other).
fn sum(families: &[MetricFamily], a: &str, b: &str, model_label: &str) -> Vec<Metric> {
    let mut total = values(families, a, model_label);
    for (key, v) in values(families, b, model_label) {
        *total.entry(key).or_insert(0.0) += v;
    }
    total
        .iter()
        .map(|(key, v)| metric_from(key, MetricType::COUNTER, *v))
        .collect()
}

/// vLLM's names of measurements Tandem has under its own: (Tandem's, vLLM's).
const VLLM_RENAMES: &[(&str, &str)] = &[
    (
        names::FRONTEND_TIME_TO_FIRST_TOKEN_SECONDS,
        "vllm:time_to_first_token_seconds",
    ),
    (
        names::FRONTEND_INTER_TOKEN_LATENCY_SECONDS,
        "vllm:inter_token_latency_seconds",
    ),
    (
        names::FRONTEND_INTER_TOKEN_LATENCY_SECONDS,
        "vllm:time_per_output_token_seconds",
    ),
    (
        names::FRONTEND_REQUEST_DURATION_SECONDS,
        "vllm:e2e_request_latency_seconds",
    ),
    (names::FRONTEND_INPUT_TOKENS, "vllm:request_prompt_tokens"),
    (
        names::FRONTEND_OUTPUT_TOKENS,
        "vllm:request_generation_tokens",
    ),
    (names::WORKER_RUNNING_SEQUENCES, "vllm:num_requests_running"),
    (names::WORKER_QUEUE_DEPTH, "vllm:num_requests_waiting"),
    (
        names::WORKER_DECODE_TOKENS_TOTAL,
        "vllm:generation_tokens_total",
    ),
    (
        names::WORKER_PREEMPTIONS_TOTAL,
        "vllm:num_preemptions_total",
    ),
    (
        names::WORKER_PREFIX_CACHE_HITS_TOTAL,
        "vllm:prefix_cache_hits_total",
    ),
    (
        names::WORKER_REQUEST_QUEUE_SECONDS,
        "vllm:request_queue_time_seconds",
    ),
    (
        names::WORKER_REQUEST_PREFILL_SECONDS,
        "vllm:request_prefill_time_seconds",
    ),
    (
        names::WORKER_REQUEST_DECODE_SECONDS,
        "vllm:request_decode_time_seconds",
    ),
];

/// Dynamo's names of measurements Tandem has under its own: (Tandem's, Dynamo's).
const DYNAMO_RENAMES: &[(&str, &str)] = &[
    (
        names::FRONTEND_REQUESTS_TOTAL,
        "dynamo_frontend_requests_total",
    ),
    (
        names::FRONTEND_INFLIGHT_REQUESTS,
        "dynamo_frontend_inflight_requests",
    ),
    (
        names::FRONTEND_TIME_TO_FIRST_TOKEN_SECONDS,
        "dynamo_frontend_time_to_first_token_seconds",
    ),
    (
        names::FRONTEND_INTER_TOKEN_LATENCY_SECONDS,
        "dynamo_frontend_inter_token_latency_seconds",
    ),
    (
        names::FRONTEND_REQUEST_DURATION_SECONDS,
        "dynamo_frontend_request_duration_seconds",
    ),
    (
        names::FRONTEND_INPUT_TOKENS,
        "dynamo_frontend_input_sequence_tokens",
    ),
    (
        names::FRONTEND_OUTPUT_TOKENS,
        "dynamo_frontend_output_sequence_tokens",
    ),
    (
        names::WORKER_KV_BLOCKS_USED,
        "dynamo_component_kvstats_active_blocks",
    ),
    (
        names::WORKER_KV_BLOCKS_TOTAL,
        "dynamo_component_kvstats_total_blocks",
    ),
];

/// vLLM's names (v1 engine; the v0 names its example dashboard still queries too).
fn vllm(families: &[MetricFamily]) -> Vec<MetricFamily> {
    let l = VLLM_MODEL_LABEL;
    let mut out = renamed_all(families, VLLM_RENAMES, l);
    // Prompt tokens a worker processed, computed or served from its prefix cache: what vLLM
    // counts as both its prompt tokens and its prefix-cache queries.
    let prompt = sum(
        families,
        names::WORKER_PREFILL_TOKENS_TOTAL,
        names::WORKER_PREFIX_CACHE_HITS_TOTAL,
        l,
    );
    out.push(family(
        "vllm:prompt_tokens_total",
        "Prompt tokens processed, computed or from the prefix cache (as tandem_worker_prefill_tokens_total + tandem_worker_prefix_cache_hits_total).",
        MetricType::COUNTER,
        prompt.clone(),
    ));
    out.push(family(
        "vllm:prefix_cache_queries_total",
        "Prompt tokens looked up in the prefix cache (as tandem_worker_prefill_tokens_total + tandem_worker_prefix_cache_hits_total).",
        MetricType::COUNTER,
        prompt,
    ));
    for name in ["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"] {
        out.push(kv_usage(families, name, l));
    }
    // Requests that finished without an error. vLLM splits them by finish reason; Tandem's
    // counter has none, so the series carries no `finished_reason` label.
    if let Some(src) = find(families, names::FRONTEND_REQUESTS_TOTAL) {
        let metrics = src
            .get_metric()
            .iter()
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|p| p.name() == "status" && p.value() == "ok")
            })
            .map(|m| {
                let mut m = m.clone();
                let labels = relabel(&m, l, &["status"]);
                m.set_label(labels);
                m
            })
            .collect();
        out.push(family(
            "vllm:request_success_total",
            "Requests that finished without an error (as tandem_frontend_requests_total{status=\"ok\"}).",
            MetricType::COUNTER,
            metrics,
        ));
    }
    out
}

/// Dynamo's frontend names and its workers' KV statistics.
fn dynamo(families: &[MetricFamily]) -> Vec<MetricFamily> {
    let l = MODEL_LABEL;
    let mut out = renamed_all(families, DYNAMO_RENAMES, l);
    out.push(kv_usage(
        families,
        "dynamo_component_kvstats_gpu_cache_usage_percent",
        l,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{
        Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
        TextEncoder,
    };

    /// A registry with a few of the real families, filled as one request would fill them.
    fn gathered() -> Vec<MetricFamily> {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(names::FRONTEND_REQUESTS_TOTAL, "requests"),
            &["model", "status"],
        )
        .unwrap();
        let ttft = HistogramVec::new(
            HistogramOpts::new(names::FRONTEND_TIME_TO_FIRST_TOKEN_SECONDS, "ttft"),
            &["model"],
        )
        .unwrap();
        let used =
            IntGaugeVec::new(Opts::new(names::WORKER_KV_BLOCKS_USED, "used"), &["role"]).unwrap();
        let total =
            IntGaugeVec::new(Opts::new(names::WORKER_KV_BLOCKS_TOTAL, "total"), &["role"]).unwrap();
        let prefill = IntCounterVec::new(
            Opts::new(names::WORKER_PREFILL_TOKENS_TOTAL, "prefill"),
            &["role"],
        )
        .unwrap();
        let hits = IntCounterVec::new(
            Opts::new(names::WORKER_PREFIX_CACHE_HITS_TOTAL, "hits"),
            &["role"],
        )
        .unwrap();
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(ttft.clone()),
            Box::new(used.clone()),
            Box::new(total.clone()),
            Box::new(prefill.clone()),
            Box::new(hits.clone()),
        ] {
            r.register(c).unwrap();
        }
        requests.with_label_values(&["m", "ok"]).inc_by(3);
        requests.with_label_values(&["m", "client_error"]).inc();
        ttft.with_label_values(&["m"]).observe(0.05);
        used.with_label_values(&["decode"]).set(30);
        total.with_label_values(&["decode"]).set(120);
        prefill.with_label_values(&["decode"]).inc_by(100);
        hits.with_label_values(&["decode"]).inc_by(28);
        r.gather()
    }

    fn text(families: &[MetricFamily]) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(families, &mut buf).unwrap();
        String::from_utf8(buf).unwrap()
    }

    fn exposition(compat: &[Compat]) -> Exposition {
        Exposition {
            model: Some("SmolLM2".into()),
            compat: compat.to_vec(),
        }
    }

    #[test]
    fn every_series_gets_the_model_label_and_keeps_its_own() {
        let out = text(&exposition(&[]).apply(gathered()));
        assert!(
            out.contains("tandem_worker_kv_blocks_used{model=\"SmolLM2\",role=\"decode\"} 30"),
            "{out}"
        );
        // The frontend's own `model` label is not overwritten or doubled.
        assert!(
            out.contains("tandem_frontend_requests_total{model=\"m\",status=\"ok\"} 3"),
            "{out}"
        );
        assert!(!out.contains("vllm:") && !out.contains("dynamo_"), "{out}");
    }

    #[test]
    fn without_a_model_name_nothing_is_added() {
        let out = text(&Exposition::default().apply(gathered()));
        assert!(
            out.contains("tandem_worker_kv_blocks_used{role=\"decode\"} 30"),
            "{out}"
        );
    }

    #[test]
    fn vllm_names_carry_model_name_and_the_same_values() {
        let out = text(&exposition(&[Compat::Vllm]).apply(gathered()));
        for line in [
            "vllm:kv_cache_usage_perc{model_name=\"SmolLM2\",role=\"decode\"} 0.25",
            "vllm:gpu_cache_usage_perc{model_name=\"SmolLM2\",role=\"decode\"} 0.25",
            "vllm:prompt_tokens_total{model_name=\"SmolLM2\",role=\"decode\"} 128",
            "vllm:prefix_cache_hits_total{model_name=\"SmolLM2\",role=\"decode\"} 28",
            "vllm:prefix_cache_queries_total{model_name=\"SmolLM2\",role=\"decode\"} 128",
            "vllm:request_success_total{model_name=\"m\"} 3",
            "vllm:time_to_first_token_seconds_count{model_name=\"m\"} 1",
            "# TYPE vllm:time_to_first_token_seconds histogram",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        // Only successes count as vLLM's successes.
        assert!(!out.contains("vllm:request_success_total{model_name=\"m\"} 4"));
        // The tandem series stay.
        assert!(
            out.contains("tandem_worker_kv_blocks_total{model=\"SmolLM2\",role=\"decode\"} 120")
        );
    }

    #[test]
    fn dynamo_names_keep_the_model_label() {
        let out = text(&exposition(&[Compat::Dynamo, Compat::Dynamo]).apply(gathered()));
        for line in [
            "dynamo_frontend_requests_total{model=\"m\",status=\"ok\"} 3",
            "dynamo_component_kvstats_active_blocks{model=\"SmolLM2\",role=\"decode\"} 30",
            "dynamo_component_kvstats_total_blocks{model=\"SmolLM2\",role=\"decode\"} 120",
            "dynamo_component_kvstats_gpu_cache_usage_percent{model=\"SmolLM2\",role=\"decode\"} 0.25",
            "dynamo_frontend_time_to_first_token_seconds_count{model=\"m\"} 1",
        ] {
            assert!(out.contains(line), "missing {line:?} in\n{out}");
        }
        // Asked twice, exported once.
        assert_eq!(
            out.matches("# TYPE dynamo_frontend_requests_total counter")
                .count(),
            1
        );
    }

    #[test]
    fn an_empty_pool_is_zero_percent_used() {
        let r = Registry::new();
        let used =
            IntGaugeVec::new(Opts::new(names::WORKER_KV_BLOCKS_USED, "u"), &["role"]).unwrap();
        let total =
            IntGaugeVec::new(Opts::new(names::WORKER_KV_BLOCKS_TOTAL, "t"), &["role"]).unwrap();
        r.register(Box::new(used.clone())).unwrap();
        r.register(Box::new(total.clone())).unwrap();
        used.with_label_values(&["prefill"]).set(0);
        total.with_label_values(&["prefill"]).set(0);
        let out = text(&exposition(&[Compat::Vllm]).apply(r.gather()));
        assert!(
            out.contains("vllm:kv_cache_usage_perc{model_name=\"SmolLM2\",role=\"prefill\"} 0"),
            "{out}"
        );
    }
}
