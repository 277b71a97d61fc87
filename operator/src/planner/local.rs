//! The planner over `tandem local`: its control endpoint (`GET /tiers/{tier}`,
//! `PUT /tiers/{tier}` with `{"replicas": N}`) is the [`ScaleTarget`], a Prometheus scraping the
//! processes through `tandem local --prometheus-sd-file` is the metrics source, and
//! [`LocalPlanner`] runs the same [`plan_step`] the operator runs per DisaggDeployment.
//! `planner-local` is the binary around it.

use std::fmt;
use std::time::Duration;

use tandem_api::control::{ScaleRequest, TierStatus};

use super::decide::{ConfigError, PlannerConfig, PlannerState};
use super::target::{plan_step, PlanStepError, ScaleTarget, TierReplicas};
use super::types::{Decision, Observation, Tier, TierCounts};
use super::unix_now_s;
use crate::metrics::{labels, Metrics};
use crate::prometheus::{PrometheusError, PrometheusSource, Scope};

/// Longest one control request may take: the supervisor answers at once (new workers load after
/// the answer), so a slow answer means it is gone.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the control endpoint could not be read or told.
#[derive(Debug, thiserror::Error)]
pub enum LocalTargetError {
    #[error("control endpoint URL {url:?} is not an http(s) URL")]
    Url { url: String },
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("{method} {url}: {source} (is `tandem local --control-port` running?)")]
    Request {
        method: &'static str,
        url: String,
        source: reqwest::Error,
    },
    #[error("{method} {url} answered {status}: {message}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("{method} {url} answered {body:?}, not a tier's replicas and ready: {source}")]
    Body {
        method: &'static str,
        url: String,
        body: String,
        source: serde_json::Error,
    },
}

/// The tiers of a running `tandem local`, resized through its control endpoint.
#[derive(Clone, Debug)]
pub struct LocalTarget {
    base: String,
    http: reqwest::Client,
}

impl LocalTarget {
    /// `control_url` is the control endpoint's base, e.g. `http://127.0.0.1:9100`.
    pub fn new(control_url: &str) -> Result<Self, LocalTargetError> {
        let base = control_url.trim_end_matches('/');
        let base = base.strip_suffix("/tiers").unwrap_or(base);
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(LocalTargetError::Url {
                url: control_url.to_string(),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(CONTROL_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(LocalTargetError::Client)?;
        Ok(LocalTarget {
            base: base.to_string(),
            http,
        })
    }

    fn url(&self, tier: Tier) -> String {
        format!("{}/tiers/{tier}", self.base)
    }

    /// Sends a request; the body of a success, else the endpoint's error message.
    async fn send(
        &self,
        method: &'static str,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<String, LocalTargetError> {
        let failed = |source| LocalTargetError::Request {
            method,
            url: url.to_string(),
            source,
        };
        let response = request.send().await.map_err(failed)?;
        let status = response.status();
        let body = response.text().await.map_err(failed)?;
        if status.is_success() {
            return Ok(body);
        }
        // The endpoint's errors are `{"error": {"message": ...}}`; anything else verbatim.
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or(body);
        Err(LocalTargetError::Status {
            method,
            url: url.to_string(),
            status: status.as_u16(),
            message,
        })
    }
}

impl ScaleTarget for LocalTarget {
    type Error = LocalTargetError;

    async fn replicas(&self, tier: Tier) -> Result<TierReplicas, LocalTargetError> {
        let url = self.url(tier);
        let body = self.send("GET", &url, self.http.get(&url)).await?;
        let tier: TierStatus =
            serde_json::from_str(&body).map_err(|source| LocalTargetError::Body {
                method: "GET",
                url,
                body,
                source,
            })?;
        // The supervisor runs at most 64 workers a tier: the counts fit.
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(TierReplicas {
            desired: count(tier.replicas),
            ready: count(tier.ready),
        })
    }

    /// The supervisor starts or stops workers at once; `ready` catches up as they load.
    async fn set_desired(&mut self, tier: Tier, replicas: u32) -> Result<(), LocalTargetError> {
        let url = self.url(tier);
        let body = serde_json::to_string(&ScaleRequest {
            replicas: replicas as usize,
        })
        .expect("plain data");
        let request = self
            .http
            .put(&url)
            .header("content-type", "application/json")
            .body(body);
        // The answer is every tier's new state; the next read gets what matters.
        self.send("PUT", &url, request).await.map(drop)
    }
}

/// Why a local planner step reached no decision.
#[derive(Debug, thiserror::Error)]
pub enum LocalPlannerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Prometheus(#[from] PrometheusError),
    #[error(transparent)]
    Target(#[from] PlanStepError<LocalTargetError>),
}

/// One step of the local planner: what it saw and what it did.
#[derive(Clone, Debug)]
pub struct LocalStep {
    /// Seconds since the Unix epoch when the step ran.
    pub at_s: f64,
    /// Desired replicas before the step.
    pub before: TierCounts,
    pub observation: Observation,
    pub decision: Decision,
}

impl LocalStep {
    /// This step's `tandem_planner_*` series, labelled as the operator labels its own.
    pub fn record(
        &self,
        metrics: &Metrics,
        config: &PlannerConfig,
        namespace: &str,
        deployment: &str,
    ) {
        let label = match &self.decision.refusal {
            Some(refusal) => labels::decision::not_acting(refusal.reason),
            None => labels::decision::of_change(self.before, self.decision.desired),
        };
        let o = &self.observation;
        metrics.record_planner_step(
            namespace,
            deployment,
            label,
            (o.ttft_p90_s, o.itl_p90_s),
            Some(config),
            Some(self.decision.desired),
        );
    }
}

impl LocalPlannerError {
    /// A step that reached no decision, counted by why (as the operator counts its own).
    pub fn record(
        &self,
        metrics: &Metrics,
        config: &PlannerConfig,
        namespace: &str,
        deployment: &str,
    ) {
        let label = match self {
            LocalPlannerError::Config(_) => labels::decision::INVALID_AUTOSCALING,
            LocalPlannerError::Prometheus(_) => labels::decision::PROMETHEUS_UNAVAILABLE,
            LocalPlannerError::Target(_) => labels::decision::SCALE_TARGET_UNAVAILABLE,
        };
        metrics.record_planner_step(
            namespace,
            deployment,
            label,
            (None, None),
            Some(config),
            None,
        );
    }
}

impl fmt::Display for LocalStep {
    /// One log line: the tiers' change (or hold), the inputs that drove it, and the reason.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (before, after) = (self.before, self.decision.desired);
        let tier = |f: &mut fmt::Formatter<'_>, name: Tier, from: u32, to: u32, ready: u32| {
            if from == to {
                write!(f, "{name} {to} (ready {ready})")
            } else {
                write!(f, "{name} {from}->{to} (ready {ready})")
            }
        };
        let o = &self.observation;
        tier(
            f,
            Tier::Prefill,
            before.prefill,
            after.prefill,
            o.ready.prefill,
        )?;
        f.write_str(", ")?;
        tier(f, Tier::Decode, before.decode, after.decode, o.ready.decode)?;
        let ms = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{:.0}ms", s * 1e3));
        let num = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
        write!(
            f,
            " | ttft_p90 {} itl_p90 {} rate {}/s in {} out {} queue {} | ",
            ms(o.ttft_p90_s),
            ms(o.itl_p90_s),
            num(o.request_rate),
            num(o.mean_input_tokens),
            num(o.mean_output_tokens),
            num(o.prefill_queue_depth),
        )?;
        match &self.decision.refusal {
            Some(refusal) => write!(f, "no action, {}: {}", refusal.reason, refusal.message),
            None => f.write_str(&self.decision.reason),
        }
    }
}

/// The planner loop over one `tandem local`: observe → decide → resize, every interval.
pub struct LocalPlanner {
    source: PrometheusSource,
    scope: Scope,
    target: LocalTarget,
    config: PlannerConfig,
    state: PlannerState,
}

impl LocalPlanner {
    /// `scope` selects the deployment's series by the labels `tandem local --prometheus-sd-file`
    /// gives its targets (`--namespace`, `--deployment`).
    pub fn new(
        source: PrometheusSource,
        scope: Scope,
        target: LocalTarget,
        config: PlannerConfig,
    ) -> Result<Self, LocalPlannerError> {
        config.validate()?;
        Ok(LocalPlanner {
            source,
            scope,
            target,
            config,
            state: PlannerState::default(),
        })
    }

    /// One interval: read the tiers, observe, decide, apply.
    pub async fn step(&mut self) -> Result<LocalStep, LocalPlannerError> {
        let mut observation = self.source.observe(&self.scope).await?;
        // `plan_step` reads the tiers itself; this read is for the report (before → after, and
        // the ready counts the decision saw, barring a worker becoming ready in between).
        let mut before = TierCounts::default();
        for tier in [Tier::Prefill, Tier::Decode] {
            let replicas = self
                .target
                .replicas(tier)
                .await
                .map_err(|source| PlanStepError::Read { tier, source })?;
            before.set(tier, replicas.desired);
            observation.ready.set(tier, replicas.ready);
        }
        let at_s = unix_now_s();
        let decision = plan_step(
            &mut self.target,
            &self.config,
            &mut self.state,
            observation.clone(),
            at_s,
        )
        .await?;
        Ok(LocalStep {
            at_s,
            before,
            observation,
            decision,
        })
    }

    /// Steps every `config.interval_s` until `shutdown` resolves, handing each outcome to
    /// `report` (an error does not stop the loop: Prometheus or the supervisor may come back).
    pub async fn run(
        &mut self,
        shutdown: impl std::future::Future<Output = ()>,
        mut report: impl FnMut(&Result<LocalStep, LocalPlannerError>),
    ) {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(self.config.interval_s));
        // A step that ran late (a busy machine) does not make the next ones bunch up.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                () = shutdown.as_mut() => return,
                _ = ticks.tick() => {
                    let outcome = self.step().await;
                    report(&outcome);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_url_may_name_the_tiers_path() {
        for url in [
            "http://127.0.0.1:9100",
            "http://127.0.0.1:9100/",
            "http://127.0.0.1:9100/tiers",
        ] {
            let target = LocalTarget::new(url).unwrap();
            assert_eq!(
                target.url(Tier::Prefill),
                "http://127.0.0.1:9100/tiers/prefill"
            );
        }
        let error = LocalTarget::new("127.0.0.1:9100").unwrap_err().to_string();
        assert!(error.contains("127.0.0.1:9100"), "{error}");
    }
}
