//! The planner inside the operator: per DisaggDeployment with `autoscaling.enabled`, every
//! `intervalSeconds`, read Prometheus, decide, and resize the tiers' StatefulSets.
//!
//! The reconcile calls [`Planners::step`]; it runs a planner step when one is due and returns
//! its [`StepOutcome`], which [`crate::status`] turns into status and Events. The learned
//! throughput models live here, in memory: a new leader relearns them within a few intervals
//! (the status keeps the decisions).

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::decide::{ConfigError, PlannerConfig, PlannerState};
use super::spec::planner_config;
use super::target::{plan_step, PlanStepError, ScaleTarget, TierReplicas};
use super::types::{Decision, Tier, TierCounts};
use crate::build::names;
use crate::conditions::reasons;
use crate::crd::{AutoscalingSpec, DisaggDeployment};
use crate::prometheus::{PrometheusError, PrometheusSource, Scope};
use crate::FIELD_MANAGER;

/// The tiers' StatefulSets of one deployment, as a [`ScaleTarget`]. A tier whose StatefulSet
/// does not exist (an aggregated deployment's prefill) reads as zero replicas.
pub struct StatefulSetTarget {
    api: Api<StatefulSet>,
    deployment: String,
}

impl StatefulSetTarget {
    pub fn new(client: Client, namespace: &str, deployment: &str) -> Self {
        StatefulSetTarget {
            api: Api::namespaced(client, namespace),
            deployment: deployment.to_string(),
        }
    }

    fn name(&self, tier: Tier) -> String {
        names::tier(&self.deployment, tier.into())
    }
}

impl ScaleTarget for StatefulSetTarget {
    type Error = kube::Error;

    async fn replicas(&self, tier: Tier) -> Result<TierReplicas, kube::Error> {
        let Some(sts) = self.api.get_opt(&self.name(tier)).await? else {
            return Ok(TierReplicas::default());
        };
        let desired = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let ready = sts
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        Ok(TierReplicas {
            desired: desired.max(0) as u32,
            ready: ready.max(0) as u32,
        })
    }

    /// Writes the StatefulSet's `scale` subresource, so the change takes effect even before the
    /// reconcile's apply (which writes the same number: [`crate::status`] puts the decision in
    /// the `desiredReplicas` that the apply reads).
    async fn set_desired(&mut self, tier: Tier, replicas: u32) -> Result<(), kube::Error> {
        let patch = json!({"spec": {"replicas": replicas}});
        self.api
            .patch_scale(
                &self.name(tier),
                &PatchParams {
                    field_manager: Some(FIELD_MANAGER.to_string()),
                    ..Default::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map(drop)
    }
}

/// Why a planner step did not reach a decision.
#[derive(Debug, thiserror::Error)]
pub enum PlannerError {
    #[error("planner configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("autoscaling is enabled without a prometheusUrl")]
    NoPrometheusUrl,
    #[error(transparent)]
    Prometheus(#[from] PrometheusError),
    #[error(transparent)]
    Target(#[from] PlanStepError<kube::Error>),
}

impl PlannerError {
    /// CamelCase reason of the `ScalingActive=False` condition.
    pub fn reason(&self) -> &'static str {
        match self {
            PlannerError::Config(_) | PlannerError::NoPrometheusUrl => reasons::INVALID_AUTOSCALING,
            PlannerError::Prometheus(_) => reasons::PROMETHEUS_UNAVAILABLE,
            PlannerError::Target(_) => reasons::SCALE_TARGET_UNAVAILABLE,
        }
    }
}

/// One planner step as the reconcile reports it.
#[derive(Debug)]
pub struct StepOutcome {
    /// Seconds since the Unix epoch when the step ran.
    pub at_s: f64,
    /// Desired replicas before the step (what the StatefulSets ran with).
    pub before: TierCounts,
    /// The decision, or why there is none.
    pub result: Result<Decision, PlannerError>,
    /// The observed TTFT and ITL p90, when Prometheus answered.
    pub observed_p90_s: (Option<f64>, Option<f64>),
}

impl StepOutcome {
    /// What the step says in the `ScalingActive` condition: whether the planner acted, the
    /// reason and the message (the decision's reason, or why there is none).
    pub fn scaling_active(&self) -> (bool, &'static str, String) {
        match &self.result {
            Ok(decision) => match &decision.refusal {
                Some(refusal) => (false, refusal.reason, refusal.message.clone()),
                None => (true, reasons::PLANNING, decision.reason.clone()),
            },
            Err(e) => (false, e.reason(), e.to_string()),
        }
    }
}

/// What the planner remembers per deployment.
#[derive(Default)]
struct Entry {
    state: PlannerState,
    config: Option<PlannerConfig>,
    last_step_s: Option<f64>,
    source: Option<(String, PrometheusSource)>,
}

/// The planners of every deployment this operator scales, keyed by `namespace/name`.
#[derive(Default)]
pub struct Planners {
    entries: Mutex<HashMap<String, Entry>>,
}

fn key(dd: &DisaggDeployment) -> String {
    format!("{}/{}", dd.namespace().unwrap_or_default(), dd.name_any())
}

impl Planners {
    /// Forgets a deployment whose autoscaling is off (its learned model would be stale later).
    pub fn forget(&self, dd: &DisaggDeployment) {
        self.entries.lock().expect("planners lock").remove(&key(dd));
    }

    /// Seconds until the next step of `dd` is due (0 when due now).
    pub fn due_in(&self, dd: &DisaggDeployment, interval_s: f64, now_s: f64) -> f64 {
        let entries = self.entries.lock().expect("planners lock");
        match entries.get(&key(dd)).and_then(|e| e.last_step_s) {
            Some(last) => (last + interval_s - now_s).max(0.0),
            None => 0.0,
        }
    }

    /// Runs one planner step for `dd` if one is due; `None` when it is not.
    pub async fn step(
        &self,
        client: &Client,
        dd: &DisaggDeployment,
        now_s: f64,
    ) -> Option<StepOutcome> {
        let autoscaling = dd.spec.autoscaling.as_ref().filter(|a| a.enabled)?;
        // Until a reconcile has applied the tiers and reported them there is nothing to scale.
        dd.status.as_ref().and_then(|s| s.decode.as_ref())?;
        let interval_s = f64::from(autoscaling.interval_seconds.max(1));
        // A reconcile a little early (requeue timers are not exact) still counts as due.
        if self.due_in(dd, interval_s, now_s) > 0.5 {
            return None;
        }
        let namespace = dd.namespace().unwrap_or_default();
        let name = dd.name_any();
        let mut target = StatefulSetTarget::new(client.clone(), &namespace, &name);
        // Taken out of the map for the step (reconciles of one object never overlap).
        let mut entry = {
            let mut entries = self.entries.lock().expect("planners lock");
            let entry = entries.entry(key(dd)).or_default();
            entry.last_step_s = Some(now_s);
            std::mem::take(entry)
        };
        let outcome = run_step(&mut entry, &mut target, dd, autoscaling, now_s).await;
        entry.last_step_s = Some(now_s);
        self.entries
            .lock()
            .expect("planners lock")
            .insert(key(dd), entry);
        Some(outcome)
    }
}

async fn run_step(
    entry: &mut Entry,
    target: &mut StatefulSetTarget,
    dd: &DisaggDeployment,
    autoscaling: &AutoscalingSpec,
    now_s: f64,
) -> StepOutcome {
    let mut outcome = StepOutcome {
        at_s: now_s,
        before: TierCounts::default(),
        result: Err(PlannerError::NoPrometheusUrl),
        observed_p90_s: (None, None),
    };
    for tier in [Tier::Prefill, Tier::Decode] {
        match target.replicas(tier).await {
            Ok(r) => outcome.before.set(tier, r.desired),
            Err(source) => {
                outcome.result = Err(PlanStepError::Read { tier, source }.into());
                return outcome;
            }
        }
    }
    let config = match planner_config(autoscaling, outcome.before) {
        Ok(config) => config,
        Err(e) => {
            outcome.result = Err(e.into());
            return outcome;
        }
    };
    let Some(url) = autoscaling.prometheus_url.as_deref() else {
        return outcome;
    };
    if entry.source.as_ref().is_none_or(|(u, _)| u != url) {
        match PrometheusSource::new(url) {
            Ok(source) => entry.source = Some((url.to_string(), source)),
            Err(e) => {
                outcome.result = Err(e.into());
                return outcome;
            }
        }
    }
    let (_, source) = entry.source.as_ref().expect("set above");
    let scope = Scope {
        namespace: dd.namespace().unwrap_or_default(),
        deployment: dd.name_any(),
        window_s: (2.0 * config.interval_s).ceil() as u64,
    };
    let observation = match source.observe(&scope).await {
        Ok(observation) => observation,
        Err(e) => {
            outcome.result = Err(e.into());
            return outcome;
        }
    };
    outcome.observed_p90_s = (observation.ttft_p90_s, observation.itl_p90_s);
    entry.config = Some(config.clone());
    outcome.result = plan_step(target, &config, &mut entry.state, observation, now_s)
        .await
        .map_err(PlannerError::from);
    outcome
}
