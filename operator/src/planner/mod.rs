//! The planner: decides prefill and decode replica counts from latency SLOs.
//!
//! The decision is a pure function ([`decide`]) of one [`Observation`] per interval, the
//! [`PlannerConfig`] (SLOs, bounds, stabilization, cooldown, step) and the [`PlannerState`] it
//! carries between intervals (the learned throughput model and the recommendation history).
//! [`ScaleTarget`] is the seam to whatever runs the replicas (Kubernetes StatefulSets, local
//! processes, the [`sim`] cluster); [`plan_step`] reads a target, decides and applies.
//!
//! [`sim`] is a discrete-event simulator of a P/D cluster that drives the same decision function
//! over load traces and scores it against the best static allocation.
//!
//! The vocabulary all of these share (tiers, counts per tier, observations, decisions) lives in
//! `types`; [`runner`] runs the planner inside the operator, [`local`] over `tandem local`.

use std::time::{SystemTime, UNIX_EPOCH};

mod decide;
pub mod local;
mod model;
pub mod runner;
pub mod sim;
mod spec;
mod target;
mod types;

pub use decide::{decide, ConfigError, PlannerConfig, PlannerState, Slo, TierBounds};
pub use model::{DecodeModel, PrefillModel};
pub use spec::planner_config;
pub use target::{plan_step, PlanStepError, ScaleTarget, TierReplicas};
pub use types::{Decision, Observation, Refusal, Tier, TierCounts, TierReasons};

/// The planner's clock: seconds since the Unix epoch (Prometheus timestamps use the same clock).
pub fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
