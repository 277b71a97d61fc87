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
}
