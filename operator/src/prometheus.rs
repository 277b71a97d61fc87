//! What the planner reads from Prometheus: one [`Observation`] per DisaggDeployment per interval.
//!
//! The series are the metrics contract (`docs/metrics.md`) as the scrape job in
//! `manifests/prometheus/scrape-config.yaml` labels them: every target of a Tandem pod carries
//! `namespace`, `deployment` (the pod's `tandem.dev/deployment`) and `tier` (`tandem.dev/tier`).
//! Frontend series are selected by deployment alone, so an aggregated deployment (decode pods
//! running `tandem serve`, no frontend tier) is read the same way.
//!
//! The client is `prometheus-http-query` 0.8, the last release on reqwest 0.12 (the worker's
//! reqwest; 0.9 moved to reqwest 0.13 and would put a second reqwest in the tree).

use std::time::Duration;

use prometheus_http_query::response::Data;
use prometheus_http_query::Client;
use tandem_api::metrics::names;

use crate::planner::{Observation, TierCounts};

/// Why an observation could not be read. Missing or stale *series* are not errors: they come
/// back as `None` fields and an old `timestamp_s`, and the planner refuses on them.
#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("Prometheus URL {url:?}: {source}")]
    Url {
        url: String,
        source: prometheus_http_query::Error,
    },
    #[error("building the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("Prometheus query `{query}` failed: {source}")]
    Query {
        query: String,
        source: prometheus_http_query::Error,
    },
    #[error("Prometheus query `{query}` returned a {kind}, not an instant vector")]
    UnexpectedResult { query: String, kind: &'static str },
}

/// Longest a single query may take; a planner step never waits longer on Prometheus.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// Which deployment to observe and over what window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Scope {
    pub namespace: String,
    pub deployment: String,
    /// Range of `rate()` and `histogram_quantile()`, in whole seconds. It should span at least
    /// two scrapes; the operator uses twice the planner interval.
    pub window_s: u64,
}

/// The PromQL of every [`Observation`] field, for one [`Scope`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queries {
    pub ttft_p90: String,
    pub itl_p90: String,
    pub request_rate: String,
    pub mean_input_tokens: String,
    pub mean_output_tokens: String,
    pub prefill_queue_depth: String,
    pub decode_kv_utilization: String,
    pub prefill_tokens_per_s: String,
    pub decode_tokens_per_s: String,
    /// Newest successful scrape of any of this deployment's targets (`up` is written on every
    /// scrape, even of a process that has served nothing yet; `== 1` keeps the successful
    /// ones): the observation's timestamp.
    pub newest_scrape: String,
}

/// A label value inside a PromQL double-quoted string.
fn quoted(value: &str) -> String {
    let escaped = value.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

impl Queries {
    pub fn new(scope: &Scope) -> Self {
        let selector = format!(
            "namespace={},deployment={}",
            quoted(&scope.namespace),
            quoted(&scope.deployment)
        );
        let window = format!("{}s", scope.window_s.max(1));
        let p90 = |histogram: &str| {
            format!(
                "histogram_quantile(0.9, sum by (le) (rate({histogram}_bucket{{{selector}}}[{window}])))"
            )
        };
        let mean = |histogram: &str| {
            format!(
                "sum(rate({histogram}_sum{{{selector}}}[{window}])) / sum(rate({histogram}_count{{{selector}}}[{window}]))"
            )
        };
        Queries {
            ttft_p90: p90(names::FRONTEND_TIME_TO_FIRST_TOKEN_SECONDS),
            itl_p90: p90(names::FRONTEND_INTER_TOKEN_LATENCY_SECONDS),
            // Arrivals: the input-length histogram is observed when a request is admitted, not
            // when it is answered, so an overloaded deployment's rate does not lag its load.
            request_rate: format!(
                "sum(rate({input}_count{{{selector}}}[{window}]))",
                input = names::FRONTEND_INPUT_TOKENS
            ),
            mean_input_tokens: mean(names::FRONTEND_INPUT_TOKENS),
            mean_output_tokens: mean(names::FRONTEND_OUTPUT_TOKENS),
            prefill_queue_depth: format!(
                "sum({queue}{{{selector},tier=\"prefill\"}})",
                queue = names::WORKER_QUEUE_DEPTH
            ),
            decode_kv_utilization: format!(
                "sum({used}{{{selector},tier=\"decode\"}}) / sum({total}{{{selector},tier=\"decode\"}})",
                used = names::WORKER_KV_BLOCKS_USED,
                total = names::WORKER_KV_BLOCKS_TOTAL
            ),
            prefill_tokens_per_s: format!(
                "sum(rate({tokens}{{{selector},tier=\"prefill\"}}[{window}]))",
                tokens = names::WORKER_PREFILL_TOKENS_TOTAL
            ),
            decode_tokens_per_s: format!(
                "sum(rate({tokens}{{{selector},tier=\"decode\"}}[{window}]))",
                tokens = names::WORKER_DECODE_TOKENS_TOTAL
            ),
            newest_scrape: format!("max(timestamp(up{{{selector}}} == 1))"),
        }
    }
}

/// A Prometheus server the planner queries.
#[derive(Clone)]
pub struct PrometheusSource {
    client: Client,
}

impl std::fmt::Debug for PrometheusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrometheusSource")
            .field("base_url", &self.client.base_url().as_str())
            .finish()
    }
}

impl PrometheusSource {
    /// A client for the Prometheus at `url` (e.g. `http://prometheus.monitoring:9090`).
    pub fn new(url: &str) -> Result<Self, PrometheusError> {
        let http = reqwest::Client::builder().timeout(QUERY_TIMEOUT).build()?;
        let client = Client::from(http, url).map_err(|source| PrometheusError::Url {
            url: url.to_string(),
            source,
        })?;
        Ok(PrometheusSource { client })
    }

    /// Reads one observation of `scope`. `ready` is left at zero: the scale target reports it.
    ///
    /// No traffic and no data are told apart by the arrival series: the frontend exports
    /// `tandem_frontend_input_tokens_count` from its start (at 0), so a present series with no
    /// increase in the window is a rate of 0 — the latencies and mean lengths then have no value,
    /// and the planner scales towards the minimum — while an absent series (the frontend not
    /// scraped, or its series gone stale) leaves the rate `None`, and the planner refuses.
    pub async fn observe(&self, scope: &Scope) -> Result<Observation, PrometheusError> {
        let queries = Queries::new(scope);
        // All at once, but errors are reported in this fixed order: with try_join the error of
        // whichever query failed first would win, and a condition message that changes from
        // step to step (Prometheus down: any query may fail first) is a status write each time.
        let (ttft, itl, rate, input, output, queue, kv, prefill_served, decode_served, newest) = futures::join!(
            self.scalar(&queries.ttft_p90),
            self.scalar(&queries.itl_p90),
            self.scalar(&queries.request_rate),
            self.scalar(&queries.mean_input_tokens),
            self.scalar(&queries.mean_output_tokens),
            self.scalar(&queries.prefill_queue_depth),
            self.scalar(&queries.decode_kv_utilization),
            self.scalar(&queries.prefill_tokens_per_s),
            self.scalar(&queries.decode_tokens_per_s),
            self.scalar(&queries.newest_scrape),
        );
        let (newest, ttft, itl, rate, input, output, queue, kv) =
            (newest?, ttft?, itl?, rate?, input?, output?, queue?, kv?);
        let served = (prefill_served?, decode_served?);
        Ok(Observation {
            // No scrape at all: as old as can be, so the planner calls it stale.
            timestamp_s: newest.unwrap_or(f64::NEG_INFINITY),
            ttft_p90_s: ttft,
            itl_p90_s: itl,
            request_rate: rate,
            mean_input_tokens: input,
            mean_output_tokens: output,
            prefill_queue_depth: queue,
            decode_kv_utilization: kv,
            prefill_tokens_per_s: served.0,
            decode_tokens_per_s: served.1,
            ready: TierCounts::default(),
        })
    }

    /// The value of a query that aggregates to at most one series; `None` when it returns no
    /// series or a NaN (a quantile or ratio over an empty window).
    async fn scalar(&self, query: &str) -> Result<Option<f64>, PrometheusError> {
        let result =
            self.client
                .query(query)
                .get()
                .await
                .map_err(|source| PrometheusError::Query {
                    query: query.to_string(),
                    source,
                })?;
        let value = match result.data() {
            Data::Vector(series) => series.first().map(|s| s.sample().value()),
            Data::Scalar(sample) => Some(sample.value()),
            Data::Matrix(_) => {
                return Err(PrometheusError::UnexpectedResult {
                    query: query.to_string(),
                    kind: "range vector",
                })
            }
        };
        Ok(value.filter(|v| v.is_finite()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_select_the_deployment_by_the_scrape_jobs_labels() {
        let queries = Queries::new(&Scope {
            namespace: "prod".into(),
            deployment: "llama".into(),
            window_s: 60,
        });
        assert_eq!(
            queries.ttft_p90,
            "histogram_quantile(0.9, sum by (le) (rate(tandem_frontend_time_to_first_token_seconds_bucket{namespace=\"prod\",deployment=\"llama\"}[60s])))"
        );
        assert_eq!(
            queries.decode_kv_utilization,
            "sum(tandem_worker_kv_blocks_used{namespace=\"prod\",deployment=\"llama\",tier=\"decode\"}) / sum(tandem_worker_kv_blocks_total{namespace=\"prod\",deployment=\"llama\",tier=\"decode\"})"
        );
        assert!(queries.prefill_queue_depth.contains("tier=\"prefill\""));
        // The request rate counts arrivals (observed at admission), not answers.
        assert_eq!(
            queries.request_rate,
            "sum(rate(tandem_frontend_input_tokens_count{namespace=\"prod\",deployment=\"llama\"}[60s]))"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(quoted(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
