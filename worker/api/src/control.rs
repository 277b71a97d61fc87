//! The JSON of `tandem local`'s control endpoint (`--control-port`), the local stand-in for
//! a StatefulSet's `replicas` that the planner (`planner-local`) drives:
//!
//! - `GET /tiers` → [`Tiers`]; `GET /tiers/{prefill|decode}` → [`TierStatus`]
//! - `PUT /tiers/{prefill|decode}` with a [`ScaleRequest`] → the tier's new [`TierStatus`]
//!
//! Errors are `{"error": {"message": "..."}}` with a 4xx status.

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TierStatus {
    /// Processes wanted (running, starting or waiting to restart).
    pub replicas: usize,
    /// Of those, the ones answering `/health` with 200.
    pub ready: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tiers {
    pub prefill: TierStatus,
    pub decode: TierStatus,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    pub replicas: usize,
}
