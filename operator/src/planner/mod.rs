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

mod decide;
pub mod local;
mod model;
pub mod runner;
pub mod sim;
mod spec;
mod target;

pub use decide::{
    decide, ConfigError, Decision, Observation, PlannerConfig, PlannerState, Refusal, Slo,
    TierBounds, TierCounts, TierReasons,
};
pub use model::{DecodeModel, PrefillModel};
pub use spec::planner_config;
pub use target::{plan_step, PlanStepError, ScaleTarget, Tier, TierReplicas};
