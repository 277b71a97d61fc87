//! `DisaggDeployment.status`: computed and written here, and nowhere else.
//!
//! Two parts of the operator have something to say in status, and both say it through this
//! module:
//! - the reconcile, after its apply: each tier's replicas as the API server returned the
//!   workloads, and the `Ready`, `Progressing` and `Degraded` conditions ([`status_from`]), or
//!   why the deployment could not be reconciled ([`failed_status`]);
//! - the planner, after a step: the `ScalingActive` condition and, per tier it changed,
//!   `desiredReplicas` with `lastScaleTime` and `lastScaleReason` ([`Scaling::write`]), which the
//!   apply of the same reconcile then reads (`build` sizes a planned tier from
//!   `desiredReplicas`).
//!
//! [`patch`] writes the result, by server-side apply under the one field manager.
//!
//! The planner's part is remembered per deployment ([`Scaling`]): the object a reconcile gets
//! comes from the informer cache, which may not show the status the last reconcile wrote yet.
//! Taken from such a copy, `desiredReplicas` would make the apply revert the planner's last
//! change and the status write drop its record of why; so every reconcile of a planned
//! deployment writes the remembered part over a copy older than it.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::build::names;
use crate::conditions::{reasons, types};
use crate::crd::{DisaggDeployment, DisaggDeploymentStatus, TierStatus, HTTP_PORT};
use crate::planner::runner::StepOutcome;
use crate::planner::Tier;
use crate::FIELD_MANAGER;

/// What the API server returned for the workloads after apply: status is computed from these,
/// never from what was merely requested.
#[derive(Clone, Debug, Default)]
pub struct Applied {
    pub frontend: Option<Deployment>,
    pub prefill: Option<StatefulSet>,
    pub decode: StatefulSet,
}

/// An Event to record: its type, reason (from [`reasons`]) and note.
pub type StatusEvent = (EventType, &'static str, String);

/// Writes `status` with server-side apply under the one field manager. An object deleted
/// since the reconcile began has no status left to write: that is not an error.
pub async fn patch(
    client: &Client,
    dd: &DisaggDeployment,
    status: &DisaggDeploymentStatus,
) -> Result<(), kube::Error> {
    let api: Api<DisaggDeployment> =
        Api::namespaced(client.clone(), &dd.namespace().unwrap_or_default());
    let body = json!({
        "apiVersion": DisaggDeployment::api_version(&()),
        "kind": DisaggDeployment::kind(&()),
        "status": status,
    });
    api.patch_status(
        &dd.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(drop)
    .or_else(|e| match e {
        kube::Error::Api(status) if status.is_not_found() => Ok(()),
        other => Err(other),
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

/// `"True"` or `"False"`, as a condition's status.
fn condition_status(status: bool) -> &'static str {
    if status {
        "True"
    } else {
        "False"
    }
}

/// `new` as it replaces the condition of its type in `conditions`: `lastTransitionTime` moves
/// only when the status flips.
fn settled(conditions: &[Condition], mut new: Condition) -> Condition {
    if let Some(old) = conditions.iter().find(|c| c.type_ == new.type_) {
        if old.status == new.status {
            new.last_transition_time = old.last_transition_time.clone();
        }
    }
    new
}

/// Sets the condition of `new`'s type; `lastTransitionTime` moves only when the status flips.
fn set_condition(conditions: &mut Vec<Condition>, new: Condition) {
    let new = settled(conditions, new);
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => *old = new,
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
        status: condition_status(status).into(),
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

/// `status.<tier>.lastScaleTime` of a change made at `at_s`: whole seconds, as the API server
/// keeps a Time, so the status written with the change and any later write of it agree exactly.
fn scale_time(at_s: f64) -> Time {
    Time(Timestamp::from_second(at_s.floor() as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// `status.<tier>.lastScaleReason` of a change: the decision's line for the tier, bounded.
fn scale_reason(reason: &str) -> String {
    reason.chars().take(1000).collect()
}

/// The planner's last change of one tier: what `status.<tier>` must show.
#[derive(Clone, Debug, PartialEq)]
struct ScaleRecord {
    at_s: f64,
    desired: u32,
    reason: String,
}

/// The planner's part of one deployment's status, as last written.
#[derive(Default)]
struct Planned {
    /// The `ScalingActive` condition of the last step. Only the planner sets it, so it is the
    /// newest there is.
    scaling_active: Option<Condition>,
    /// The last change of each tier (indexed by [`Tier`]).
    last_scale: [Option<ScaleRecord>; 2],
}

/// The planner's part of every deployment's status, keyed by `namespace/name`: what the last
/// steps wrote, so a reconcile on an older copy writes it again instead of reverting it.
#[derive(Default)]
pub struct Scaling {
    entries: Mutex<HashMap<String, Planned>>,
}

fn key(dd: &DisaggDeployment) -> String {
    format!("{}/{}", dd.namespace().unwrap_or_default(), dd.name_any())
}

impl Scaling {
    /// Forgets a deployment whose autoscaling is off: its status is the reconcile's alone again.
    pub fn forget(&self, dd: &DisaggDeployment) {
        self.entries.lock().expect("scaling lock").remove(&key(dd));
    }

    /// Writes the planner's part of `view`'s status: the step `step` that ran in this reconcile,
    /// if one did, and every earlier change that `view` (the reconcile's copy) does not show yet
    /// (never over a later change another leader made since). Returns the Events of the step: a
    /// Warning when the planner stops acting or stops for another reason, one per tier changed.
    pub fn write(
        &self,
        view: &mut DisaggDeployment,
        step: Option<&StepOutcome>,
        now: &Time,
    ) -> Vec<StatusEvent> {
        let mut entries = self.entries.lock().expect("scaling lock");
        let mut events = Vec::new();
        // Changes of this very step are the newest by construction: written whatever the copy
        // shows.
        let mut changed_now = [false; 2];
        if let Some(step) = step {
            let planned = entries.entry(key(view)).or_default();
            let conditions = view
                .status
                .as_ref()
                .map_or(&[][..], |s| s.conditions.as_slice());
            let (active, reason, message) = step.scaling_active();
            let new = Condition {
                type_: types::SCALING_ACTIVE.into(),
                status: condition_status(active).into(),
                reason: reason.into(),
                message: message.chars().take(1000).collect(),
                observed_generation: view.metadata.generation,
                last_transition_time: now.clone(),
            };
            let flips = conditions
                .iter()
                .find(|c| c.type_ == types::SCALING_ACTIVE)
                .is_none_or(|old| old.status != new.status || old.reason != reason);
            if !active && flips {
                events.push((EventType::Warning, reason, message));
            }
            planned.scaling_active = Some(settled(conditions, new));
            if let Ok(decision) = &step.result {
                for tier in [Tier::Prefill, Tier::Decode] {
                    let (before, after) = (step.before.get(tier), decision.desired.get(tier));
                    if before == after {
                        continue;
                    }
                    let why = decision.tier_reasons.get(tier).to_string();
                    planned.last_scale[tier as usize] = Some(ScaleRecord {
                        at_s: step.at_s,
                        desired: after,
                        reason: why.clone(),
                    });
                    changed_now[tier as usize] = true;
                    events.push((EventType::Normal, reasons::SCALED, why));
                }
            }
        }
        let Some(planned) = entries.get(&key(view)) else {
            return events;
        };
        let status = view.status.get_or_insert_with(Default::default);
        if let Some(condition) = &planned.scaling_active {
            set_condition(&mut status.conditions, condition.clone());
        }
        for (tier, tier_status) in [
            (Tier::Prefill, &mut status.prefill),
            (Tier::Decode, &mut status.decode),
        ] {
            let Some(record) = &planned.last_scale[tier as usize] else {
                continue;
            };
            let changed_at = scale_time(record.at_s);
            let shown = tier_status
                .as_ref()
                .and_then(|s| s.last_scale_time.as_ref());
            // A later record (another leader scaled since) is newer than an earlier step's.
            if changed_now[tier as usize] || shown.is_none_or(|shown| shown.0 < changed_at.0) {
                let s = tier_status.get_or_insert_with(Default::default);
                s.desired_replicas = record.desired as i32;
                s.last_scale_time = Some(changed_at);
                s.last_scale_reason = Some(scale_reason(&record.reason));
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};

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

    mod planner {
        use super::super::*;
        use super::find;
        use crate::planner::runner::StepOutcome;
        use crate::planner::{Decision, TierCounts};

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

        fn scaling_with(dd: &DisaggDeployment, prefill: ScaleRecord) -> Scaling {
            let scaling = Scaling::default();
            scaling.entries.lock().unwrap().insert(
                key(dd),
                Planned {
                    last_scale: [Some(prefill), None],
                    ..Default::default()
                },
            );
            scaling
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
            scaling_with(&dd, scale_down_at(160.7)).write(&mut dd, None, &scale_time(200.0));
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
            let scaling = scaling_with(&dd, scale_down_at(160.7));
            let planning = Condition {
                type_: "ScalingActive".into(),
                status: "True".into(),
                reason: "Planning".into(),
                message: "prefill 1->3: TTFT p90 4777ms vs SLO 500ms (breach)".into(),
                observed_generation: None,
                last_transition_time: scale_time(100.0),
            };
            scaling
                .entries
                .lock()
                .unwrap()
                .get_mut(&key(&dd))
                .unwrap()
                .scaling_active = Some(planning.clone());
            scaling.write(&mut dd, None, &scale_time(200.0));
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
            scaling.write(&mut dd, None, &scale_time(200.0));
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
                scaling_with(&dd, scale_down_at(160.7)).write(&mut dd, None, &scale_time(200.0));
                assert_eq!(dd.status, before, "{shown}");
            }
        }

        /// A step at `at_s` that takes prefill from 3 to 1 and holds decode.
        fn scale_down_step(at_s: f64) -> StepOutcome {
            let mut decision = Decision {
                desired: TierCounts {
                    prefill: 1,
                    decode: 1,
                },
                reason: "prefill 3->1: comfortably under; decode 1->1: hold".into(),
                tier_reasons: Default::default(),
                refusal: None,
            };
            decision
                .tier_reasons
                .set(Tier::Prefill, "prefill 3->1: comfortably under".into());
            decision
                .tier_reasons
                .set(Tier::Decode, "decode 1->1: hold".into());
            StepOutcome {
                at_s,
                before: TierCounts {
                    prefill: 3,
                    decode: 1,
                },
                result: Ok(decision),
                observed_p90_s: (None, None),
            }
        }

        #[test]
        fn a_step_writes_its_change_condition_and_events_and_later_copies_get_them_again() {
            let mut dd = deployment(
                "{replicas: 3, readyReplicas: 3, desiredReplicas: 3, \
                 lastScaleTime: '1970-01-01T00:01:40Z', lastScaleReason: 'prefill 1->3: breach'}",
            );
            let stale = dd.clone();
            let scaling = Scaling::default();
            let events = scaling.write(&mut dd, Some(&scale_down_step(160.7)), &scale_time(160.0));
            assert_eq!(
                events,
                vec![(
                    EventType::Normal,
                    reasons::SCALED,
                    "prefill 3->1: comfortably under".to_string()
                )]
            );
            let written = dd.status.clone().unwrap();
            let prefill = written.prefill.as_ref().unwrap();
            assert_eq!(prefill.desired_replicas, 1);
            assert_eq!(prefill.last_scale_time, Some(scale_time(160.0)));
            let active = find(&written, types::SCALING_ACTIVE);
            assert_eq!(
                (active.status.as_str(), active.reason.as_str()),
                ("True", reasons::PLANNING)
            );
            assert_eq!(written.decode, stale.status.as_ref().unwrap().decode);

            // A reconcile without a step, on the copy from before it, writes the same.
            let mut again = stale;
            assert!(scaling
                .write(&mut again, None, &scale_time(170.0))
                .is_empty());
            assert_eq!(again.status.unwrap(), written);
        }

        #[test]
        fn a_steps_own_change_is_written_over_a_copy_showing_the_same_second() {
            // An earlier step in the same second scaled prefill to 3; this one takes it to 1.
            let mut dd = deployment(
                "{replicas: 3, readyReplicas: 3, desiredReplicas: 3, \
                 lastScaleTime: '1970-01-01T00:02:40Z', lastScaleReason: 'prefill 1->3: breach'}",
            );
            Scaling::default().write(&mut dd, Some(&scale_down_step(160.7)), &scale_time(160.0));
            let prefill = dd.status.unwrap().prefill.unwrap();
            assert_eq!(prefill.desired_replicas, 1);
            assert_eq!(
                prefill.last_scale_reason.as_deref(),
                Some("prefill 3->1: comfortably under")
            );
        }
    }
}
