//! Names of status conditions and their reasons, in one place so status, Events, docs and tests
//! agree.

/// Condition types on `DisaggDeployment.status.conditions`.
pub mod types {
    /// Every tier has all its desired replicas ready and the API Service has endpoints.
    pub const READY: &str = "Ready";
    /// The operator applied a change that pods have not caught up with yet.
    pub const PROGRESSING: &str = "Progressing";
    /// The deployment cannot reach its declared state without a change (bad spec, failed apply).
    pub const DEGRADED: &str = "Degraded";
    /// With `autoscaling.enabled`: whether the planner acted on its last interval (False says
    /// why not: metrics missing or stale, Prometheus or the StatefulSets unreachable).
    pub const SCALING_ACTIVE: &str = "ScalingActive";
}

/// `reason` values (CamelCase, as Kubernetes requires).
pub mod reasons {
    pub const ALL_TIERS_READY: &str = "AllTiersReady";
    pub const TIERS_NOT_READY: &str = "TiersNotReady";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const UP_TO_DATE: &str = "UpToDate";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const MALFORMED_OBJECT: &str = "MalformedObject";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const RECONCILED: &str = "Reconciled";
    /// The planner decided on fresh metrics (the message says what and why).
    pub const PLANNING: &str = "Planning";
    /// The planner changed a tier's replicas (Event reason).
    pub const SCALED: &str = "Scaled";
}
