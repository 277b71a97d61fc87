//! The reconcile pipeline: plan → validate → build → apply → status, with Events, metrics and
//! an `error_policy` that waits on bad specs and backs off on transient API errors.
//!
//! With autoscaling on, a reconcile first runs the planner's step when one is due
//! ([`crate::planner::runner`]); status is computed and written by [`crate::status`], which the
//! planner's outcome and the apply's result both go through.

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryFutureExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ObjectReference, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{DeserializeGuard, NamespaceResourceScope};
use kube::runtime::controller::{self as kube_controller, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::store::Writer;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::{info, instrument, warn};

use crate::build::{self, names, Children};
use crate::cache::{self, Cached, ChildCache, ChildWriters, Lookup};
use crate::conditions::reasons;
use crate::crd::{DisaggDeployment, DisaggDeploymentStatus, Tier};
use crate::metrics::{labels, Metrics};
use crate::planner::runner::{Planners, StepOutcome};
use crate::planner::unix_now_s;
use crate::status::{self, failed_status, status_from, Applied, Scaling};
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
    /// Stable label of `tandem_operator_reconcile_errors_total` ([`labels::category`]).
    pub fn category(&self) -> &'static str {
        match self {
            Error::InvalidSpec(_) => labels::category::INVALID_SPEC,
            Error::MalformedObject(_) => labels::category::MALFORMED_OBJECT,
            Error::Api { .. } => labels::category::API,
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
    /// The planner's part of their status, as last written.
    pub scaling: Scaling,
    /// Consecutive transient failures per object, for exponential backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The children as the controller's watches last saw them.
    pub cache: ChildCache,
    /// Taken by [`run`], whose watches fill [`Context::cache`].
    writers: Mutex<Option<ChildWriters>>,
}

impl Context {
    pub fn new(client: Client, reporter: Reporter, metrics: Metrics) -> Self {
        let (cache, writers) = cache::new();
        Self {
            client,
            reporter,
            metrics,
            planners: Planners::default(),
            scaling: Scaling::default(),
            failures: Mutex::default(),
            cache,
            writers,
        }
    }

    /// The writing ends of [`Context::cache`], once: [`run`] takes them for its watches (a test
    /// may take them to fill the cache itself).
    pub fn take_writers(&self) -> Option<ChildWriters> {
        self.writers.lock().expect("writers lock").take()
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

/// The controller's watch of one child kind: objects labelled as ours, kept in `writer`'s store
/// (without `managedFields`, which nothing reads), each change triggering its owner's reconcile.
fn owned<K>(
    api: Api<K>,
    config: watcher::Config,
    writer: Writer<K>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    watcher(api, config)
        .default_backoff()
        .modify(|obj: &mut K| obj.meta_mut().managed_fields = None)
        .reflect(writer)
        .touched_objects()
}

/// Runs the controller until a shutdown signal, reconciling DisaggDeployments in `namespace`
/// (all namespaces when `None`), at most `max_concurrent` at a time (0: no bound).
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, max_concurrent: u16) {
    let client = ctx.client.clone();
    let writers = ctx
        .take_writers()
        .expect("controller::run runs once per Context");
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
    let ns = &namespace;
    Controller::new(
        api::<DeserializeGuard<DisaggDeployment>>(&client, ns),
        watcher::Config::default(),
    )
    .with_config(kube_controller::Config::default().concurrency(max_concurrent))
    .owns_stream(owned(
        api::<ServiceAccount>(&client, ns),
        managed.clone(),
        writers.service_accounts,
    ))
    .owns_stream(owned(
        api::<Role>(&client, ns),
        managed.clone(),
        writers.roles,
    ))
    .owns_stream(owned(
        api::<RoleBinding>(&client, ns),
        managed.clone(),
        writers.role_bindings,
    ))
    .owns_stream(owned(
        api::<Service>(&client, ns),
        managed.clone(),
        writers.services,
    ))
    .owns_stream(owned(
        api::<Deployment>(&client, ns),
        managed.clone(),
        writers.deployments,
    ))
    .owns_stream(owned(
        api::<StatefulSet>(&client, ns),
        managed.clone(),
        writers.statefulsets,
    ))
    .owns_stream(owned(
        api::<PodDisruptionBudget>(&client, ns),
        managed,
        writers.disruption_budgets,
    ))
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
            ctx.metrics
                .reconciles
                .with_label_values(&[labels::result::OK])
                .inc();
            ctx.failures
                .lock()
                .expect("failures lock")
                .remove(&Context::failures_key(&guard));
        }
        Err(e) => {
            ctx.metrics
                .reconciles
                .with_label_values(&[labels::result::ERROR])
                .inc();
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
    // The status the cache shows: a status equal to it is not written again.
    let shown = dd.status.clone();
    // The planner runs first on a valid spec: its decision goes into the status that `build`
    // reads, so this very reconcile applies it.
    let (planned, planner_interval) = autoscale(dd, ctx, &recorder, &reference, &now).await;
    let dd = &planned;
    let valid = match validate(dd) {
        Ok(v) => v,
        Err(e) => {
            let status = failed_status(dd, reasons::INVALID_SPEC, &e.to_string(), now);
            patch_status(ctx, dd, shown.as_ref(), &status).await?;
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
    let applied = match apply(ctx, &valid.namespace, &valid.name, dd, &children).await {
        Ok(applied) => applied,
        Err(e) => {
            let status = failed_status(dd, reasons::APPLY_FAILED, &e.to_string(), now);
            // The status write may fail for the same reason; the apply error is the one to report.
            let _ = patch_status(ctx, dd, shown.as_ref(), &status).await;
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
    patch_status(ctx, dd, shown.as_ref(), &status).await?;
    let spec_changed =
        dd.status.as_ref().and_then(|s| s.observed_generation) != dd.metadata.generation;
    if spec_changed {
        let (reason, note) = if dd.status.is_none() {
            (
                reasons::CREATED,
                format!("created {} children", children.to_values().len()),
            )
        } else {
            (
                reasons::UPDATED,
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

/// With autoscaling on: runs the planner's step when one is due and returns the deployment as
/// the rest of the reconcile should see it (the planner's part of status written by
/// [`Scaling::write`]: `status.<tier>.desiredReplicas`, `lastScaleTime`, `lastScaleReason` and
/// the `ScalingActive` condition), with the interval to requeue after. Records the step's Events
/// (one per change, and when the planner stops acting) and its metrics.
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
        ctx.scaling.forget(dd);
        return (view, None);
    };
    let interval_s = f64::from(autoscaling.interval_seconds.max(1));
    if validate(dd).is_err() {
        return (view, None);
    }
    let step = ctx.planners.step(&ctx.client, dd, unix_now_s()).await;
    if let Some(step) = &step {
        record_step_metrics(dd, step, &ctx.metrics);
    }
    for (type_, reason, note) in ctx.scaling.write(&mut view, step.as_ref(), now) {
        publish(recorder, reference, type_, reason, &note).await;
    }
    // A reconcile between steps (a child changed) requeues for the step still due, not for a
    // whole interval from now.
    let next_step_s = ctx.planners.due_in(dd, interval_s, unix_now_s()).max(1.0);
    (view, Some(Duration::from_secs_f64(next_step_s)))
}

/// The `tandem_planner_*` metrics of one step.
fn record_step_metrics(dd: &DisaggDeployment, step: &StepOutcome, metrics: &Metrics) {
    let namespace = dd.namespace().unwrap_or_default();
    let name = dd.name_any();
    let (active, reason, _) = step.scaling_active();
    let label = match &step.result {
        Ok(decision) if active => labels::decision::of_change(step.before, decision.desired),
        _ => labels::decision::not_acting(reason),
    };
    let desired = step.result.as_ref().ok().map(|d| d.desired);
    let config = dd
        .spec
        .autoscaling
        .as_ref()
        .and_then(|a| crate::planner::planner_config(a, step.before).ok());
    metrics.record_planner_step(
        &namespace,
        &name,
        label,
        step.observed_p90_s,
        config.as_ref(),
        desired,
    );
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

/// The result of one child's apply, for [`Metrics::child_applies`].
fn count_apply(ctx: &Context, result: &'static str) {
    ctx.metrics.child_applies.with_label_values(&[result]).inc();
}

/// Server-side applies `obj` (stamped by [`cache::stamp`]) unless the cache shows the object
/// already holds it; returns the object as the API server (or the cache) has it.
async fn apply_one<K>(ctx: &Context, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Cached
        + Resource<Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let stamped = cache::stamp(obj);
    if let Lookup::Present(have) = ctx.cache.lookup::<K>(ns, &name) {
        let want = serde_json::to_value(&stamped).expect("a child always serializes");
        let have_value = serde_json::to_value(have.as_ref()).expect("a cached object serializes");
        match cache::first_difference(&have_value, &want) {
            None => {
                count_apply(ctx, labels::apply::UNCHANGED);
                return Ok(K::clone(&have));
            }
            Some(path) => tracing::debug!(
                kind = %K::kind(&()),
                %name,
                differs_at = %path,
                "the cached copy differs from the apply body"
            ),
        }
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let result = api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&stamped),
        )
        .await
        .map_err(|source| Error::Api {
            action: "apply",
            kind: K::kind(&()).to_string(),
            name,
            source,
        });
    count_apply(ctx, labels::apply::APPLIED);
    result
}

/// Deletes `name` if it exists and this deployment controls it: a tier removed from the spec
/// takes its objects with it, while same-named objects of others are left alone. Reads the
/// cache, or the API server while the cache has not listed yet.
async fn prune<K>(ctx: &Context, ns: &str, name: &str, owner_uid: &str) -> Result<(), Error>
where
    K: Cached + Resource<Scope = NamespaceResourceScope> + DeserializeOwned + Clone + Debug,
{
    let api: Api<K> = Api::namespaced(ctx.client.clone(), ns);
    let err = |action, source| Error::Api {
        action,
        kind: K::kind(&()).to_string(),
        name: name.to_string(),
        source,
    };
    let existing = match ctx.cache.lookup::<K>(ns, name) {
        Lookup::Present(obj) => K::clone(&obj),
        Lookup::Absent => return Ok(()),
        Lookup::Unknown => match api.get_opt(name).await.map_err(|e| err("get", e))? {
            Some(obj) => obj,
            None => return Ok(()),
        },
    };
    let ours = existing
        .owner_references()
        .iter()
        .any(|r| r.controller == Some(true) && r.uid == owner_uid);
    if ours {
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            // Gone since the cache saw it: what pruning wanted.
            Err(kube::Error::Api(status)) if status.is_not_found() => {}
            Err(e) => return Err(err("delete", e)),
        }
    }
    Ok(())
}

/// Applies `obj` when the spec has it, else prunes the object of that name.
async fn apply_or_prune<K>(
    ctx: &Context,
    ns: &str,
    name: String,
    obj: Option<&K>,
    owner_uid: &str,
) -> Result<Option<K>, Error>
where
    K: Cached
        + Resource<Scope = NamespaceResourceScope>
        + Serialize
        + DeserializeOwned
        + Clone
        + Debug,
{
    match obj {
        Some(obj) => apply_one(ctx, ns, obj).await.map(Some),
        None => prune::<K>(ctx, ns, &name, owner_uid).await.map(|()| None),
    }
}

/// Server-side applies every child and prunes the children of tiers no longer in the spec, in
/// two concurrent rounds: first everything the pods depend on or that guards them (the
/// ServiceAccount their admission needs, RBAC, Services, PodDisruptionBudgets), then the
/// workloads. Children the cache shows unchanged are not applied ([`crate::cache`]).
pub async fn apply(
    ctx: &Context,
    ns: &str,
    name: &str,
    dd: &DisaggDeployment,
    children: &Children,
) -> Result<Applied, Error> {
    let uid = dd.metadata.uid.clone().unwrap_or_default();
    let uid = uid.as_str();
    let (role, binding) = match (&children.discovery_role, &children.discovery_role_binding) {
        (Some(role), Some(binding)) => (Some(role), Some(binding)),
        _ => (None, None),
    };
    let prefill_service = children
        .prefill
        .as_ref()
        .and(children.prefill_service.as_ref());
    let prefill = children
        .prefill_service
        .as_ref()
        .and(children.prefill.as_ref());
    let pdbs = [Tier::Frontend, Tier::Prefill, Tier::Decode].map(|tier| {
        let pdb_name = names::tier(name, tier);
        let pdb = children
            .disruption_budgets
            .iter()
            .find(|p| p.metadata.name.as_deref() == Some(&pdb_name));
        apply_or_prune(ctx, ns, pdb_name.clone(), pdb, uid)
    });
    // A RoleBinding is refused (404) until its Role exists: the Role goes first, and when
    // pruning, the binding that refers to it.
    let rbac = async {
        let role_name = names::discovery_role(name);
        if role.is_some() {
            apply_or_prune(ctx, ns, role_name.clone(), role, uid).await?;
            apply_or_prune(ctx, ns, role_name, binding, uid)
                .await
                .map(drop)
        } else {
            apply_or_prune(ctx, ns, role_name.clone(), binding, uid).await?;
            apply_or_prune(ctx, ns, role_name, role, uid)
                .await
                .map(drop)
        }
    };
    futures::try_join!(
        apply_one(ctx, ns, &children.service_account),
        rbac,
        apply_one(ctx, ns, &children.api_service),
        apply_or_prune(
            ctx,
            ns,
            names::tier(name, Tier::Prefill),
            prefill_service,
            uid
        ),
        apply_one(ctx, ns, &children.decode_service),
        futures::future::try_join_all(pdbs),
    )?;
    let (frontend, prefill, decode) = futures::try_join!(
        apply_or_prune(
            ctx,
            ns,
            names::tier(name, Tier::Frontend),
            children.frontend.as_ref(),
            uid
        ),
        apply_or_prune(ctx, ns, names::tier(name, Tier::Prefill), prefill, uid),
        apply_one(ctx, ns, &children.decode),
    )?;
    Ok(Applied {
        frontend,
        prefill,
        decode,
    })
}

/// Writes `status` through [`status::patch`] unless it equals `shown`, the status the cache
/// shows; an API error fails the reconcile.
async fn patch_status(
    ctx: &Context,
    dd: &DisaggDeployment,
    shown: Option<&DisaggDeploymentStatus>,
    status: &DisaggDeploymentStatus,
) -> Result<(), Error> {
    let same = shown
        .is_some_and(|shown| serde_json::to_value(shown).ok() == serde_json::to_value(status).ok());
    if same {
        ctx.metrics
            .status_writes
            .with_label_values(&[labels::apply::UNCHANGED])
            .inc();
        return Ok(());
    }
    ctx.metrics
        .status_writes
        .with_label_values(&[labels::apply::APPLIED])
        .inc();
    status::patch(&ctx.client, dd, status)
        .map_err(|source| Error::Api {
            action: "patch status of",
            kind: DisaggDeployment::kind(&()).into_owned(),
            name: dd.name_any(),
            source,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_five_seconds_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}
