//! The reconcile pipeline: validate → build → apply → status, with Events, metrics and an
//! `error_policy` that waits on bad specs and backs off on transient API errors.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{DeserializeGuard, NamespaceResourceScope};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tracing::{info, instrument, warn};

use crate::build::{self, names, Children};
use crate::conditions::{reasons, types};
use crate::crd::{DisaggDeployment, DisaggDeploymentStatus, Tier, TierStatus, HTTP_PORT};
use crate::metrics::Metrics;
use crate::planner::runner::{scale_reason, scale_time, unix_now_s, Planners, StepOutcome};
use crate::validate::{validate, ValidationError};
use crate::FIELD_MANAGER;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    InvalidSpec(#[from] ValidationError),
    #[error("object does not match the DisaggDeployment schema: {0}")]
    MalformedObject(String),
    #[error("{action} {kind} {name}: {source}")]
    Api {
        action: &'static str,
        kind: String,
        name: String,
        source: kube::Error,
    },
}

impl Error {
    /// Stable label for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => "invalid_spec",
            Error::MalformedObject(_) => "malformed_object",
            Error::Api { .. } => "api",
        }
    }

    /// Whether waiting for the user to change the object is the only cure.
    pub fn needs_spec_change(&self) -> bool {
        matches!(self, Error::InvalidSpec(_) | Error::MalformedObject(_))
    }
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub reporter: Reporter,
    pub metrics: Metrics,
    /// The planner of every deployment with autoscaling on.
    pub planners: Planners,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Metrics) -> Self {
        Self {
            client,
            reporter,
            metrics,
            planners: Planners::default(),
            failures: Mutex::default(),
        }
    }

    fn failures_key(dd: &DeserializeGuard<DisaggDeployment>) -> String {
        let meta = match &dd.0 {
            Ok(dd) => &dd.metadata,
            Err(invalid) => &invalid.metadata,
        };
        format!(
            "{}/{}",
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default()
        )
    }
}

/// Requeue interval of a healthy deployment (children are watched; this is a safety net).
const RESYNC: Duration = Duration::from_secs(300);
const BACKOFF_BASE: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Delay after `failures` consecutive transient errors: 5 s, 10 s, 20 s … capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    let factor = 1u32
        .checked_shl(failures.saturating_sub(1))
        .unwrap_or(u32::MAX);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

/// Runs the controller until a shutdown signal, reconciling DisaggDeployments in `namespace`
/// (all namespaces when `None`).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>) {
    let client = ctx.client.clone();
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let managed =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    Controller::new(
        api::<DeserializeGuard<DisaggDeployment>>(&client, &namespace),
        watcher::Config::default(),
    )
    .owns(api::<Deployment>(&client, &namespace), managed.clone())
    .owns(api::<StatefulSet>(&client, &namespace), managed.clone())
    .owns(api::<Service>(&client, &namespace), managed.clone())
    .owns(api::<PodDisruptionBudget>(&client, &namespace), managed)
    .shutdown_on_signal()
    .run(reconcile, error_policy, ctx)
    .for_each(|result| async move {
        match result {
            Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
            Err(e) => warn!(error = %e, "reconcile failed"),
        }
    })
    .await;
}

/// One reconcile, measured.
#[instrument(skip_all, fields(object = %Context::failures_key(&guard)))]
pub async fn reconcile(
    guard: Arc<DeserializeGuard<DisaggDeployment>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = match &guard.0 {
        Ok(dd) => reconcile_valid(dd, &ctx).await,
        Err(invalid) => {
            // Its status cannot be written through the typed API; an Event still reaches
            // `kubectl describe`.
            let reference = ObjectReference {
                api_version: Some(DisaggDeployment::api_version(&()).into_owned()),
                kind: Some(DisaggDeployment::kind(&()).into_owned()),
                name: invalid.metadata.name.clone(),
                namespace: invalid.metadata.namespace.clone(),
                uid: invalid.metadata.uid.clone(),
                ..Default::default()
            };
            let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
            publish(
                &recorder,
                &reference,
                EventType::Warning,
                reasons::MALFORMED_OBJECT,
                &invalid.error,
            )
            .await;
            Err(Error::MalformedObject(invalid.error.clone()))
        }
    };
    ctx.metrics
        .duration
        .with_label_values::<&str>(&[])
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
            ctx.failures
                .lock()
                .expect("failures lock")
                .remove(&Context::failures_key(&guard));
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics.errors.with_label_values(&[e.category()]).inc();
        }
    }
    result
}

/// Invalid specs wait for a change; API errors retry with exponential backoff.
pub fn error_policy(
    guard: Arc<DeserializeGuard<DisaggDeployment>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    if error.needs_spec_change() {
        return Action::await_change();
    }
    let mut failures = ctx.failures.lock().expect("failures lock");
    let n = failures.entry(Context::failures_key(&guard)).or_insert(0);
    *n = n.saturating_add(1);
    Action::requeue(backoff(*n))
}

async fn reconcile_valid(dd: &DisaggDeployment, ctx: &Context) -> Result<Action, Error> {
    let recorder = Recorder::new(ctx.client.clone(), ctx.reporter.clone());
    let reference = dd.object_ref(&());
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    // The planner runs first on a valid spec: its decision goes into the status that `build`
    // reads, so this very reconcile applies it.
    let (planned, planner_interval) = autoscale(dd, ctx, &recorder, &reference, &now).await;
    let dd = &planned;
    let valid = match validate(dd) {
        Ok(v) => v,
        Err(e) => {
            let status = failed_status(dd, reasons::INVALID_SPEC, &e.to_string(), now);
            patch_status(&ctx.client, dd, &status).await?;
            publish(
                &recorder,
                &reference,
                EventType::Warning,
                reasons::INVALID_SPEC,
                &e.to_string(),
            )
            .await;
            return Err(e.into());
        }
    };
    let children = build::build(&valid);
    let applied = match apply(&ctx.client, &valid.namespace, &valid.name, dd, &children).await {
        Ok(applied) => applied,
        Err(e) => {
            let status = failed_status(dd, reasons::APPLY_FAILED, &e.to_string(), now);
            // The status write may fail for the same reason; the apply error is the one to report.
            let _ = patch_status(&ctx.client, dd, &status).await;
            publish(
                &recorder,
                &reference,
                EventType::Warning,
                reasons::APPLY_FAILED,
                &e.to_string(),
            )
            .await;
            return Err(e);
        }
    };
    let status = status_from(dd, &applied, now);
    patch_status(&ctx.client, dd, &status).await?;
    let spec_changed =
        dd.status.as_ref().and_then(|s| s.observed_generation) != dd.metadata.generation;
    if spec_changed {
        let (reason, note) = if dd.status.is_none() {
            (
                "Created",
                format!("created {} children", children.to_values().len()),
            )
        } else {
            (
                "Updated",
                format!(
                    "applied generation {}",
                    dd.metadata.generation.unwrap_or_default()
                ),
            )
        };
        info!(reason, note, "applied children");
        publish(&recorder, &reference, EventType::Normal, reason, &note).await;
    }
    Ok(Action::requeue(
        planner_interval.map_or(RESYNC, |i| i.min(RESYNC)),
    ))
}

/// With autoscaling on and a planner step due: runs it and returns the deployment as the rest
/// of the reconcile should see it (the decision in `status.<tier>.desiredReplicas`,
/// `lastScaleTime`, `lastScaleReason` and the `ScalingActive` condition), with the interval to
/// requeue after. Records an Event per change and when the planner stops acting.
async fn autoscale(
    dd: &DisaggDeployment,
    ctx: &Context,
    recorder: &Recorder,
    reference: &ObjectReference,
    now: &Time,
) -> (DisaggDeployment, Option<Duration>) {
    let mut view = dd.clone();
    let Some(autoscaling) = dd.spec.autoscaling.as_ref().filter(|a| a.enabled) else {
        ctx.planners.forget(dd);
        return (view, None);
    };
    let interval_s = f64::from(autoscaling.interval_seconds.max(1));
    if validate(dd).is_err() {
        return (view, None);
    }
    if let Some(outcome) = ctx.planners.step(&ctx.client, dd, unix_now_s()).await {
        for (type_, reason, note) in record_step(&mut view, &outcome, &ctx.metrics, now) {
            publish(recorder, reference, type_, reason, &note).await;
        }
        let written = view.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == types::SCALING_ACTIVE)
        });
        if let Some(condition) = written {
            ctx.planners.remember_condition(dd, condition.clone());
        }
    }
    ctx.planners.overlay_latest(&mut view);
    // A reconcile between steps (a child changed) requeues for the step still due, not for a
    // whole interval from now.
    let next_step_s = ctx.planners.due_in(dd, interval_s, unix_now_s()).max(1.0);
    (view, Some(Duration::from_secs_f64(next_step_s)))
}

/// Writes one planner step into `view`'s status and the planner metrics; returns the Events to
/// record. Pure but for the metrics.
pub fn record_step(
    view: &mut DisaggDeployment,
    outcome: &StepOutcome,
    metrics: &Metrics,
    now: &Time,
) -> Vec<(EventType, &'static str, String)> {
    use crate::planner::Tier as PlannerTier;
    let namespace = view.namespace().unwrap_or_default();
    let name = view.name_any();
    let previous = view
        .status
        .as_ref()
        .and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == types::SCALING_ACTIVE)
        })
        .map(|c| (c.status.clone(), c.reason.clone()));
    let mut events = Vec::new();
    let (active, reason, message, label) = match &outcome.result {
        Ok(decision) => match &decision.refusal {
            Some(refusal) => (
                false,
                refusal.reason,
                refusal.message.clone(),
                if refusal.reason == "MetricsStale" {
                    "metrics_stale"
                } else {
                    "metrics_missing"
                },
            ),
            None => {
                let (up, down) = [PlannerTier::Prefill, PlannerTier::Decode].iter().fold(
                    (false, false),
                    |(up, down), tier| {
                        let (before, after) =
                            (outcome.before.get(*tier), decision.desired.get(*tier));
                        (up || after > before, down || after < before)
                    },
                );
                let label = match (up, down) {
                    (true, _) => "scale_up",
                    (false, true) => "scale_down",
                    _ => "hold",
                };
                (true, reasons::PLANNING, decision.reason.clone(), label)
            }
        },
        Err(e) => (
            false,
            e.reason(),
            e.to_string(),
            match e.reason() {
                "PrometheusUnavailable" => "prometheus_unavailable",
                "ScaleTargetUnavailable" => "scale_target_unavailable",
                _ => "invalid_autoscaling",
            },
        ),
    };
    metrics
        .planner_decisions
        .with_label_values(&[namespace.as_str(), name.as_str(), label])
        .inc();
    for (metric, value) in [
        ("ttft", outcome.observed_p90_s.0),
        ("itl", outcome.observed_p90_s.1),
    ] {
        if let Some(value) = value {
            metrics
                .planner_observed_p90
                .with_label_values(&[namespace.as_str(), name.as_str(), metric])
                .set(value);
        }
    }
    let status_flips = previous.as_ref().is_none_or(|(status, old_reason)| {
        status != if active { "True" } else { "False" } || old_reason != reason
    });
    if !active && status_flips {
        events.push((EventType::Warning, reason, message.clone()));
    }
    let condition = Condition {
        type_: types::SCALING_ACTIVE.into(),
        status: if active { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.chars().take(1000).collect(),
        observed_generation: view.metadata.generation,
        last_transition_time: now.clone(),
    };
    let status = view.status.get_or_insert_with(Default::default);
    set_condition(&mut status.conditions, condition);
    if let Ok(decision) = &outcome.result {
        for tier in [PlannerTier::Prefill, PlannerTier::Decode] {
            let (before, after) = (outcome.before.get(tier), decision.desired.get(tier));
            let tier_name = tier.to_string();
            metrics
                .planner_desired
                .with_label_values(&[namespace.as_str(), name.as_str(), tier_name.as_str()])
                .set(f64::from(after));
            if before == after {
                continue;
            }
            let why = decision.tier_reasons.get(tier).to_string();
            let slot = match tier {
                PlannerTier::Prefill => &mut status.prefill,
                PlannerTier::Decode => &mut status.decode,
            };
            let tier_status = slot.get_or_insert_with(Default::default);
            tier_status.desired_replicas = after as i32;
            tier_status.last_scale_time = Some(scale_time(outcome.at_s));
            tier_status.last_scale_reason = Some(scale_reason(&why));
            events.push((EventType::Normal, reasons::SCALED, why));
        }
    }
    events
}

/// Events are best effort: failing to record one must not fail the reconcile.
async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, reference).await {
        warn!(error = %e, reason, "could not record event");
    }
}

/// What the API server returned for the workloads after apply: status is computed from these,
/// never from what was merely requested.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub frontend: Option<Deployment>,
    pub prefill: Option<StatefulSet>,
    pub decode: StatefulSet,
}

async fn apply_one<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Api {
        action: "apply",
        kind: K::kind(&()).to_string(),
        name,
        source,
    })
}

/// Deletes `name` if it exists and this deployment controls it: a tier removed from the spec
/// takes its objects with it, while same-named objects of others are left alone.
async fn prune<K>(client: &Client, ns: &str, name: &str, owner_uid: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let err = |action, source| Error::Api {
        action,
        kind: K::kind(&()).to_string(),
        name: name.to_string(),
        source,
    };
    let Some(existing) = api.get_opt(name).await.map_err(|e| err("get", e))? else {
        return Ok(());
    };
    let ours = existing
        .owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid);
    if ours {
        api.delete(name, &DeleteParams::background())
            .await
            .map_err(|e| err("delete", e))?;
    }
    Ok(())
}

/// Server-side applies every child (RBAC first), then prunes the children of tiers no longer in
/// the spec.
pub async fn apply(
    client: &Client,
    ns: &str,
    name: &str,
    dd: &DisaggDeployment,
    children: &Children,
) -> Result<Applied, Error> {
    let uid = dd.metadata.uid.clone().unwrap_or_default();
    apply_one::<ServiceAccount>(client, ns, &children.service_account).await?;
    match (&children.discovery_role, &children.discovery_role_binding) {
        (Some(role), Some(binding)) => {
            apply_one::<Role>(client, ns, role).await?;
            apply_one::<RoleBinding>(client, ns, binding).await?;
        }
        _ => {
            prune::<RoleBinding>(client, ns, &names::discovery_role(name), &uid).await?;
            prune::<Role>(client, ns, &names::discovery_role(name), &uid).await?;
        }
    }
    apply_one::<Service>(client, ns, &children.api_service).await?;
    let frontend = match &children.frontend {
        Some(d) => Some(apply_one::<Deployment>(client, ns, d).await?),
        None => {
            prune::<Deployment>(client, ns, &names::tier(name, Tier::Frontend), &uid).await?;
            None
        }
    };
    let prefill = match (&children.prefill_service, &children.prefill) {
        (Some(svc), Some(sts)) => {
            apply_one::<Service>(client, ns, svc).await?;
            Some(apply_one::<StatefulSet>(client, ns, sts).await?)
        }
        _ => {
            prune::<StatefulSet>(client, ns, &names::tier(name, Tier::Prefill), &uid).await?;
            prune::<Service>(client, ns, &names::tier(name, Tier::Prefill), &uid).await?;
            None
        }
    };
    apply_one::<Service>(client, ns, &children.decode_service).await?;
    let decode = apply_one::<StatefulSet>(client, ns, &children.decode).await?;
    for tier in [Tier::Frontend, Tier::Prefill, Tier::Decode] {
        let pdb_name = names::tier(name, tier);
        match children
            .disruption_budgets
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(&pdb_name))
        {
            Some(pdb) => drop(apply_one::<PodDisruptionBudget>(client, ns, pdb).await?),
            None => prune::<PodDisruptionBudget>(client, ns, &pdb_name, &uid).await?,
        }
    }
    Ok(Applied {
        frontend,
        prefill,
        decode,
    })
}

/// Writes `status` with server-side apply under the one field manager. An object deleted
/// since the reconcile began has no status left to write: that is not an error.
pub async fn patch_status(
    client: &Client,
    dd: &DisaggDeployment,
    status: &DisaggDeploymentStatus,
) -> Result<(), Error> {
    let name = dd.name_any();
    let api: Api<DisaggDeployment> =
        Api::namespaced(client.clone(), &dd.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": DisaggDeployment::api_version(&()),
        "kind": DisaggDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(drop)
    .or_else(|e| match e {
        kube::Error::Api(status) if status.is_not_found() => Ok(()),
        other => Err(other),
    })
    .map_err(|source| Error::Api {
        action: "patch status of",
        kind: "DisaggDeployment".into(),
        name,
        source,
    })
}

fn tier_status(
    replicas: i32,
    ready: i32,
    desired: i32,
    previous: Option<&TierStatus>,
) -> TierStatus {
    TierStatus {
        replicas,
        ready_replicas: ready,
        desired_replicas: desired,
        summary: Some(format!("{ready}/{desired}")),
        // The planner's record of its last decision survives the operator's status writes.
        last_scale_time: previous.and_then(|p| p.last_scale_time.clone()),
        last_scale_reason: previous.and_then(|p| p.last_scale_reason.clone()),
    }
}

fn statefulset_status(sts: &StatefulSet, previous: Option<&TierStatus>) -> (TierStatus, bool) {
    let s = sts.status.clone().unwrap_or_default();
    let desired = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let rolled_out = s.observed_generation >= sts.metadata.generation
        && s.updated_replicas.unwrap_or(0) >= desired
        && s.current_revision.is_some()
        && s.current_revision == s.update_revision;
    let ready = s.ready_replicas.unwrap_or(0);
    (
        tier_status(s.replicas, ready, desired, previous),
        rolled_out && ready >= desired,
    )
}

fn deployment_status(d: &Deployment, previous: Option<&TierStatus>) -> (TierStatus, bool) {
    let s = d.status.clone().unwrap_or_default();
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready = s.ready_replicas.unwrap_or(0);
    let rolled_out = s.observed_generation >= d.metadata.generation
        && s.updated_replicas.unwrap_or(0) >= desired;
    (
        tier_status(s.replicas.unwrap_or(0), ready, desired, previous),
        rolled_out && ready >= desired,
    )
}

/// Sets the condition of `new`'s type; `lastTransitionTime` moves only when the status flips.
pub(crate) fn set_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            // lastTransitionTime moves only when the status flips.
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            *old = new;
        }
        None => conditions.push(new),
    }
}

fn condition(
    dd: &DisaggDeployment,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: dd.metadata.generation,
        last_transition_time: now.clone(),
    }
}

/// Status after a successful apply. Pure: `now` stamps conditions that change.
pub fn status_from(dd: &DisaggDeployment, applied: &Applied, now: Time) -> DisaggDeploymentStatus {
    let previous = dd.status.clone().unwrap_or_default();
    let mut status = DisaggDeploymentStatus {
        observed_generation: dd.metadata.generation,
        conditions: previous.conditions.clone(),
        endpoint: Some(format!(
            "http://{}.{}.svc:{HTTP_PORT}/v1",
            names::api_service(&dd.name_any()),
            dd.namespace().unwrap_or_default()
        )),
        ..Default::default()
    };
    let mut not_ready = Vec::new();
    let mut all_rolled_out = true;
    if let Some(d) = &applied.frontend {
        let (s, done) = deployment_status(d, previous.frontend.as_ref());
        if s.ready_replicas < s.desired_replicas || s.desired_replicas == 0 {
            not_ready.push(format!(
                "frontend {}",
                s.summary.clone().unwrap_or_default()
            ));
        }
        all_rolled_out &= done;
        status.frontend = Some(s);
    }
    if let Some(sts) = &applied.prefill {
        let (s, done) = statefulset_status(sts, previous.prefill.as_ref());
        if s.ready_replicas < s.desired_replicas {
            not_ready.push(format!("prefill {}", s.summary.clone().unwrap_or_default()));
        }
        all_rolled_out &= done;
        status.prefill = Some(s);
    }
    let (s, done) = statefulset_status(&applied.decode, previous.decode.as_ref());
    if s.ready_replicas < s.desired_replicas || s.desired_replicas == 0 {
        not_ready.push(format!("decode {}", s.summary.clone().unwrap_or_default()));
    }
    all_rolled_out &= done;
    status.decode = Some(s);

    let ready = not_ready.is_empty();
    let (reason, message) = if ready {
        (
            reasons::ALL_TIERS_READY,
            "every tier has its desired replicas ready".to_string(),
        )
    } else {
        (
            reasons::TIERS_NOT_READY,
            format!("ready/desired: {}", not_ready.join(", ")),
        )
    };
    set_condition(
        &mut status.conditions,
        condition(dd, types::READY, ready, reason, message, &now),
    );
    let (reason, message) = if all_rolled_out {
        (
            reasons::UP_TO_DATE,
            "every tier runs the current pod template".to_string(),
        )
    } else {
        (
            reasons::ROLLING_OUT,
            "pods are being created or replaced".to_string(),
        )
    };
    set_condition(
        &mut status.conditions,
        condition(
            dd,
            types::PROGRESSING,
            !all_rolled_out,
            reason,
            message,
            &now,
        ),
    );
    set_condition(
        &mut status.conditions,
        condition(
            dd,
            types::DEGRADED,
            false,
            reasons::RECONCILED,
            "all children applied".into(),
            &now,
        ),
    );
    status
}

/// Status when the deployment cannot be reconciled: the previous tier counts stay, Degraded and
/// not Ready say why.
pub fn failed_status(
    dd: &DisaggDeployment,
    reason: &str,
    message: &str,
    now: Time,
) -> DisaggDeploymentStatus {
    let mut status = dd.status.clone().unwrap_or_default();
    status.observed_generation = dd.metadata.generation;
    set_condition(
        &mut status.conditions,
        condition(dd, types::DEGRADED, true, reason, message.into(), &now),
    );
    set_condition(
        &mut status.conditions,
        condition(dd, types::READY, false, reason, message.into(), &now),
    );
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::jiff::Timestamp;

    fn dd() -> DisaggDeployment {
        let mut dd: DisaggDeployment = serde_yaml::from_str(
            "metadata: {name: s, namespace: ns, uid: u, generation: 3}
spec:
  model: {name: m, source: 'file:///m'}
  image: img
  decode: {replicas: 2, gpusPerReplica: 0}",
        )
        .unwrap();
        dd.metadata.generation = Some(3);
        dd
    }

    fn decode(ready: i32, updated: i32, revision: &str) -> StatefulSet {
        StatefulSet {
            metadata: kube::api::ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(2),
                ..Default::default()
            }),
            status: Some(StatefulSetStatus {
                observed_generation: Some(1),
                replicas: 2,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                current_revision: Some("r1".into()),
                update_revision: Some(revision.into()),
                ..Default::default()
            }),
        }
    }

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    fn find<'a>(s: &'a DisaggDeploymentStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn rollout_in_progress_is_progressing_and_not_ready() {
        let applied = Applied {
            decode: decode(1, 1, "r2"),
            ..Default::default()
        };
        let s = status_from(&dd(), &applied, at(100));
        assert_eq!(s.observed_generation, Some(3));
        let ready = find(&s, types::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", reasons::TIERS_NOT_READY)
        );
        assert!(ready.message.contains("decode 1/2"), "{}", ready.message);
        assert_eq!(find(&s, types::PROGRESSING).status, "True");
        assert_eq!(s.decode.as_ref().unwrap().summary.as_deref(), Some("1/2"));
    }

    #[test]
    fn transition_time_moves_only_when_a_condition_flips() {
        let mut dd = dd();
        let rolled = Applied {
            decode: decode(2, 2, "r1"),
            ..Default::default()
        };
        dd.status = Some(status_from(&dd, &rolled, at(100)));
        assert_eq!(
            find(dd.status.as_ref().unwrap(), types::READY).status,
            "True"
        );

        let same = status_from(&dd, &rolled, at(200));
        assert_eq!(
            find(&same, types::READY).last_transition_time,
            at(100),
            "unchanged: keeps its time"
        );

        let degraded = Applied {
            decode: decode(1, 2, "r1"),
            ..Default::default()
        };
        let flipped = status_from(&dd, &degraded, at(300));
        assert_eq!(find(&flipped, types::READY).status, "False");
        assert_eq!(find(&flipped, types::READY).last_transition_time, at(300));
    }

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
