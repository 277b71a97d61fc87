//! From a DisaggDeployment's `spec.autoscaling` to the planner's [`PlannerConfig`].

use super::decide::{ConfigError, PlannerConfig, Slo, TierBounds};
use super::types::TierCounts;
use crate::crd::{AutoscalingSpec, ReplicaBounds};

/// The configuration the planner runs a deployment with.
///
/// A tier without bounds in `spec.autoscaling` is not the planner's to scale: it is pinned to
/// the replicas it runs now (`current`), so the planner still reads its latency but never
/// changes it. Knobs the CRD does not expose keep [`PlannerConfig::new`]'s defaults; the
/// staleness limit follows the interval (two intervals).
pub fn planner_config(
    autoscaling: &AutoscalingSpec,
    current: TierCounts,
) -> Result<PlannerConfig, ConfigError> {
    let slo = autoscaling.slo.as_ref().map_or(
        Slo {
            ttft_p90_s: 0.0,
            itl_p90_s: 0.0,
        },
        |slo| Slo {
            ttft_p90_s: f64::from(slo.ttft_p90_ms) / 1e3,
            itl_p90_s: f64::from(slo.itl_p90_ms) / 1e3,
        },
    );
    let bounds = |spec: Option<ReplicaBounds>, current: u32| match spec {
        Some(b) => TierBounds {
            min: b.min_replicas.max(0) as u32,
            max: b.max_replicas.max(0) as u32,
        },
        None => TierBounds {
            min: current,
            max: current,
        },
    };
    let mut config = PlannerConfig::new(
        slo,
        bounds(autoscaling.prefill, current.prefill),
        bounds(autoscaling.decode, current.decode),
    );
    config.interval_s = f64::from(autoscaling.interval_seconds);
    config.max_staleness_s = 2.0 * config.interval_s;
    config.scale_up_stabilization_s = f64::from(autoscaling.scale_up_stabilization_seconds);
    config.scale_down_stabilization_s = f64::from(autoscaling.scale_down_stabilization_seconds);
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AutoscalingSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn maps_slo_bounds_interval_and_windows() {
        let config = planner_config(
            &spec(
                "{enabled: true, prometheusUrl: 'http://p:9090', intervalSeconds: 15,
                  slo: {ttftP90Ms: 400, itlP90Ms: 40},
                  prefill: {minReplicas: 1, maxReplicas: 4}, decode: {minReplicas: 2, maxReplicas: 8},
                  scaleUpStabilizationSeconds: 30, scaleDownStabilizationSeconds: 120}",
            ),
            TierCounts {
                prefill: 3,
                decode: 3,
            },
        )
        .unwrap();
        assert_eq!(
            config.slo,
            Slo {
                ttft_p90_s: 0.4,
                itl_p90_s: 0.04
            }
        );
        assert_eq!(config.prefill_bounds, TierBounds { min: 1, max: 4 });
        assert_eq!(config.decode_bounds, TierBounds { min: 2, max: 8 });
        assert_eq!(config.interval_s, 15.0);
        assert_eq!(config.max_staleness_s, 30.0);
        assert_eq!(config.scale_up_stabilization_s, 30.0);
        assert_eq!(config.scale_down_stabilization_s, 120.0);
    }

    #[test]
    fn a_tier_without_bounds_is_pinned_to_its_current_replicas() {
        let config = planner_config(
            &spec("{enabled: true, prometheusUrl: 'http://p:9090', slo: {ttftP90Ms: 500, itlP90Ms: 50}, decode: {minReplicas: 1, maxReplicas: 8}}"),
            TierCounts { prefill: 3, decode: 2 },
        )
        .unwrap();
        assert_eq!(config.prefill_bounds, TierBounds { min: 3, max: 3 });
        assert_eq!(config.decode_bounds, TierBounds { min: 1, max: 8 });
    }

    #[test]
    fn a_missing_slo_is_refused_by_name() {
        let error = planner_config(
            &spec("{enabled: true, prometheusUrl: 'http://p:9090'}"),
            TierCounts::default(),
        )
        .unwrap_err();
        assert!(matches!(error, ConfigError::Slo { .. }), "{error}");
    }
}
