//! The seam between the decision and whatever runs the replicas.

use std::future::Future;

use super::decide::{decide, PlannerConfig, PlannerState};
use super::types::{Decision, Observation, Tier, TierCounts};

/// Replica counts of one tier as the target sees them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierReplicas {
    /// What the tier was last asked to run.
    pub desired: u32,
    /// Replicas serving now.
    pub ready: u32,
}

/// Something whose tiers the planner can resize: Kubernetes StatefulSets, local processes, the
/// simulator.
pub trait ScaleTarget {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Desired and ready replicas of a tier.
    fn replicas(
        &self,
        tier: Tier,
    ) -> impl Future<Output = Result<TierReplicas, Self::Error>> + Send;

    /// Asks the tier to run `replicas`.
    fn set_desired(
        &mut self,
        tier: Tier,
        replicas: u32,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A planner step that could not read or resize its target.
#[derive(Debug, thiserror::Error)]
pub enum PlanStepError<E: std::error::Error + 'static> {
    #[error("reading {tier} replicas: {source}")]
    Read { tier: Tier, source: E },
    #[error("setting {tier} replicas to {replicas}: {source}")]
    Apply {
        tier: Tier,
        replicas: u32,
        source: E,
    },
}

/// One planner interval against a target: read replicas, decide, apply the tiers that change.
/// `observation.ready` is replaced by what the target reports.
pub async fn plan_step<T: ScaleTarget>(
    target: &mut T,
    config: &PlannerConfig,
    state: &mut PlannerState,
    mut observation: Observation,
    now_s: f64,
) -> Result<Decision, PlanStepError<T::Error>> {
    let mut current = TierCounts::default();
    for tier in [Tier::Prefill, Tier::Decode] {
        let replicas = target
            .replicas(tier)
            .await
            .map_err(|source| PlanStepError::Read { tier, source })?;
        current.set(tier, replicas.desired);
        observation.ready.set(tier, replicas.ready);
    }
    let decision = decide(config, state, &observation, current, now_s);
    for tier in [Tier::Prefill, Tier::Decode] {
        let replicas = decision.desired.get(tier);
        if replicas != current.get(tier) {
            target
                .set_desired(tier, replicas)
                .await
                .map_err(|source| PlanStepError::Apply {
                    tier,
                    replicas,
                    source,
                })?;
        }
    }
    Ok(decision)
}
