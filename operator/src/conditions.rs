//! Names of status conditions and their reasons (also the reasons of the Events that go with
//! them), in one place so status, Events, docs and tests agree. The metric label values are in
//! [`crate::metrics::labels`].

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
    /// The first apply of a deployment's children (Event reason).
    pub const CREATED: &str = "Created";
    /// An apply of a new generation of the spec (Event reason).
    pub const UPDATED: &str = "Updated";

    /// `ScalingActive=False`: Prometheus holds no usable series of the deployment.
    pub const METRICS_MISSING: &str = "MetricsMissing";
    /// `ScalingActive=False`: the newest series are older than the staleness limit.
    pub const METRICS_STALE: &str = "MetricsStale";
    /// `ScalingActive=False`: `spec.autoscaling` cannot be planned with (no `prometheusUrl`, bad
    /// SLOs or bounds).
    pub const INVALID_AUTOSCALING: &str = "InvalidAutoscaling";
    /// `ScalingActive=False`: Prometheus could not be queried.
    pub const PROMETHEUS_UNAVAILABLE: &str = "PrometheusUnavailable";
    /// `ScalingActive=False`: the tiers' StatefulSets could not be read or resized.
    pub const SCALE_TARGET_UNAVAILABLE: &str = "ScaleTargetUnavailable";
}

#[cfg(test)]
mod tests {
    use super::types;

    #[test]
    fn the_ready_column_of_kubectl_get_shows_the_ready_condition() {
        use kube::CustomResourceExt;
        let crd = crate::crd::DisaggDeployment::crd();
        let columns = crd.spec.versions[0]
            .additional_printer_columns
            .clone()
            .unwrap_or_default();
        let ready = columns
            .iter()
            .find(|c| c.name == types::READY)
            .expect("a Ready column");
        assert_eq!(
            ready.json_path,
            format!(".status.conditions[?(@.type==\"{}\")].status", types::READY)
        );
    }
}
