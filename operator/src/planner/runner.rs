//! The planner inside the operator: per DisaggDeployment with `autoscaling.enabled`, every
//! `intervalSeconds`, read Prometheus, decide, and resize the tiers' StatefulSets.
//!
//! The reconcile calls [`Planners::step`]; it runs a planner step when one is due and returns
//! what the reconcile writes to status and Events. The learned throughput models live here, in
//! memory: a new leader relearns them within a few intervals (the status keeps the decisions).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::decide::{Decision, PlannerConfig, PlannerState, TierCounts};
use super::spec::planner_config;
use super::target::{plan_step, PlanStepError, ScaleTarget, Tier, TierReplicas};
use crate::build::names;
use crate::crd::{self, DisaggDeployment};
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
        names::tier(&self.deployment, crd_tier(tier))
    }
}

fn crd_tier(tier: Tier) -> crd::Tier {
    match tier {
        Tier::Prefill => crd::Tier::Prefill,
        Tier::Decode => crd::Tier::Decode,
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
    /// reconcile's apply (which writes the same number, from the status the planner updated).
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
    Config(#[from] super::decide::ConfigError),
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
            PlannerError::Config(_) | PlannerError::NoPrometheusUrl => "InvalidAutoscaling",
            PlannerError::Prometheus(_) => "PrometheusUnavailable",
            PlannerError::Target(_) => "ScaleTargetUnavailable",
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

/// The planner's last change of one tier: what `status.<tier>` must show.
#[derive(Clone, Debug, PartialEq)]
struct ScaleRecord {
    at_s: f64,
    desired: u32,
    reason: String,
}

/// What the planner remembers per deployment.
#[derive(Default)]
struct Entry {
    state: PlannerState,
    config: Option<PlannerConfig>,
    last_step_s: Option<f64>,
    /// The last change of each tier (indexed by [`Tier`]), to overlay on a status the informer
    /// cache may not show yet.
    last_scale: [Option<ScaleRecord>; 2],
    /// The `ScalingActive` condition of the last step, for the same reason: a reconcile on an
    /// older copy must not drop or revert it.
    scaling_active: Option<Condition>,
    source: Option<(String, PrometheusSource)>,
}

/// `status.<tier>.lastScaleTime` of a change made at `at_s`: whole seconds, as the API server
/// keeps a Time, so the step's own status write and a later overlay agree exactly.
pub fn scale_time(at_s: f64) -> Time {
    Time(Timestamp::from_second(at_s.floor() as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// `status.<tier>.lastScaleReason` of a change: the decision's line for the tier, bounded.
pub fn scale_reason(reason: &str) -> String {
    reason.chars().take(1000).collect()
}

/// The planners of every deployment this operator scales, keyed by `namespace/name`.
#[derive(Default)]
pub struct Planners {
    entries: Mutex<HashMap<String, Entry>>,
}

/// Seconds since the Unix epoch (Prometheus timestamps use the same clock).
pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn key(dd: &DisaggDeployment) -> String {
    format!("{}/{}", dd.namespace().unwrap_or_default(), dd.name_any())
}

impl Planners {
    /// Forgets a deployment whose autoscaling is off (its learned model would be stale later).
    pub fn forget(&self, dd: &DisaggDeployment) {
        self.entries.lock().expect("planners lock").remove(&key(dd));
    }

    /// Puts the planner's latest change of each tier (desired replicas, lastScaleTime,
    /// lastScaleReason) into `dd.status` when the object the reconcile got is older than that
    /// change (the informer may lag the planner's own status write), so the apply never reverts
    /// a scale the planner just made, nor the status write its record of why.
    pub fn overlay_latest(&self, dd: &mut DisaggDeployment) {
        let entries = self.entries.lock().expect("planners lock");
        let Some(entry) = entries.get(&key(dd)) else {
            return;
        };
        let status = dd.status.get_or_insert_with(Default::default);
        // Only the planner writes ScalingActive, so its last step's condition is the newest.
        if let Some(condition) = &entry.scaling_active {
            crate::controller::set_condition(&mut status.conditions, condition.clone());
        }
        for (tier, tier_status) in [
            (Tier::Prefill, &mut status.prefill),
            (Tier::Decode, &mut status.decode),
        ] {
            let Some(record) = &entry.last_scale[tier as usize] else {
                continue;
            };
            let changed_at = scale_time(record.at_s);
            let shown = tier_status
                .as_ref()
                .and_then(|s| s.last_scale_time.as_ref());
            // A later record (another leader scaled since) is newer than ours: left alone.
            if shown.is_none_or(|shown| shown.0 < changed_at.0) {
                let s = tier_status.get_or_insert_with(Default::default);
                s.desired_replicas = record.desired as i32;
                s.last_scale_time = Some(changed_at);
                s.last_scale_reason = Some(scale_reason(&record.reason));
            }
        }
    }

    /// Remembers the `ScalingActive` condition a step of `dd` wrote, for [`Self::overlay_latest`].
    pub fn remember_condition(&self, dd: &DisaggDeployment, condition: Condition) {
        if let Some(entry) = self
            .entries
            .lock()
            .expect("planners lock")
            .get_mut(&key(dd))
        {
            entry.scaling_active = Some(condition);
        }
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
        if let Ok(decision) = &outcome.result {
            for tier in [Tier::Prefill, Tier::Decode] {
                if decision.desired.get(tier) != outcome.before.get(tier) {
                    entry.last_scale[tier as usize] = Some(ScaleRecord {
                        at_s: now_s,
                        desired: decision.desired.get(tier),
                        reason: decision.tier_reasons.get(tier).to_string(),
                    });
                }
            }
        }
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
    autoscaling: &crd::AutoscalingSpec,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(prefill_status: &str) -> DisaggDeployment {
        serde_yaml::from_str(&format!(
            "metadata: {{name: llama, namespace: ns}}
spec:
  model: {{name: m, source: 'file:///m'}}
  image: img
  prefill: {{gpusPerReplica: 0}}
  decode: {{replicas: 1, gpusPerReplica: 0}}
status:
  prefill: {prefill_status}
  decode: {{replicas: 1, readyReplicas: 1, desiredReplicas: 1}}"
        ))
        .unwrap()
    }

    fn planners_with(dd: &DisaggDeployment, prefill: ScaleRecord) -> Planners {
        let planners = Planners::default();
        planners.entries.lock().unwrap().insert(
            key(dd),
            Entry {
                last_scale: [Some(prefill), None],
                ..Default::default()
            },
        );
        planners
    }

    fn scale_down_at(at_s: f64) -> ScaleRecord {
        ScaleRecord {
            at_s,
            desired: 1,
            reason: "prefill 3->1: TTFT p90 145ms vs SLO 500ms, comfortably under".into(),
        }
    }

    #[test]
    fn a_status_older_than_the_last_change_gets_all_of_it() {
        // The informer still shows the scale-up when the planner has already scaled down.
        let mut dd = deployment(
            "{replicas: 3, readyReplicas: 3, desiredReplicas: 3, \
             lastScaleTime: '1970-01-01T00:01:40Z', lastScaleReason: 'prefill 1->3: breach'}",
        );
        let untouched_decode = dd.status.as_ref().unwrap().decode.clone();
        planners_with(&dd, scale_down_at(160.7)).overlay_latest(&mut dd);
        let status = dd.status.unwrap();
        let prefill = status.prefill.unwrap();
        assert_eq!(prefill.desired_replicas, 1);
        assert_eq!(prefill.last_scale_time, Some(scale_time(160.0)));
        assert_eq!(
            prefill.last_scale_reason.as_deref(),
            Some("prefill 3->1: TTFT p90 145ms vs SLO 500ms, comfortably under")
        );
        assert_eq!(status.decode, untouched_decode, "decode never changed");
    }

    #[test]
    fn a_status_older_than_the_last_step_gets_its_scaling_active_condition() {
        // The informer's copy predates the step that scaled up: no condition yet.
        let mut dd = deployment("{replicas: 1, readyReplicas: 1, desiredReplicas: 1}");
        let planners = planners_with(&dd, scale_down_at(160.7));
        let planning = Condition {
            type_: "ScalingActive".into(),
            status: "True".into(),
            reason: "Planning".into(),
            message: "prefill 1->3: TTFT p90 4777ms vs SLO 500ms (breach)".into(),
            observed_generation: None,
            last_transition_time: scale_time(100.0),
        };
        planners.remember_condition(&dd, planning.clone());
        planners.overlay_latest(&mut dd);
        assert_eq!(
            dd.status.as_ref().unwrap().conditions,
            vec![planning.clone()]
        );
        // A copy showing an older ScalingActive (Prometheus was down) gets the newest one.
        let stale = Condition {
            status: "False".into(),
            reason: "PrometheusUnavailable".into(),
            ..planning.clone()
        };
        dd.status.as_mut().unwrap().conditions = vec![stale];
        planners.overlay_latest(&mut dd);
        assert_eq!(dd.status.unwrap().conditions, vec![planning]);
    }

    #[test]
    fn a_status_that_shows_the_change_or_a_later_one_is_left_alone() {
        for shown in [
            // The step's own write, read back: the same second.
            "{replicas: 1, readyReplicas: 1, desiredReplicas: 1, lastScaleTime: '1970-01-01T00:02:40Z', lastScaleReason: 'ours'}",
            // Another leader scaled after our last change.
            "{replicas: 2, readyReplicas: 2, desiredReplicas: 2, lastScaleTime: '1970-01-01T00:05:00Z', lastScaleReason: 'later'}",
        ] {
            let mut dd = deployment(shown);
            let before = dd.status.clone();
            planners_with(&dd, scale_down_at(160.7)).overlay_latest(&mut dd);
            assert_eq!(dd.status, before, "{shown}");
        }
    }
}
