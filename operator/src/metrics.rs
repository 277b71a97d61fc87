//! The operator's Prometheus metrics (`tandem_operator_*`), in one registry.

use prometheus::{GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use crate::planner::{PlannerConfig, Tier, TierCounts};

/// Label values of the metrics, in one place: dashboards and alerts match on them. (The `tier`
/// label is the tier's own name, `namespace` and `deployment` the object's.)
pub mod labels {
    /// `result` of `tandem_operator_reconcile_total`.
    pub mod result {
        pub const OK: &str = "ok";
        pub const ERROR: &str = "error";
    }

    /// `category` of `tandem_operator_reconcile_errors_total`.
    pub mod category {
        pub const INVALID_SPEC: &str = "invalid_spec";
        pub const MALFORMED_OBJECT: &str = "malformed_object";
        pub const API: &str = "api";
    }

    /// `result` of `tandem_operator_child_applies_total` and
    /// `tandem_operator_status_writes_total`: sent to the API server, or skipped because the
    /// watch cache showed it would change nothing.
    pub mod apply {
        pub const APPLIED: &str = "applied";
        pub const UNCHANGED: &str = "unchanged";
    }

    /// `reason` of `tandem_planner_decisions_total`: what the planner did, or why it did not act.
    pub mod decision {
        use crate::conditions::reasons;
        use crate::planner::{Tier, TierCounts};

        pub const SCALE_UP: &str = "scale_up";
        pub const SCALE_DOWN: &str = "scale_down";
        pub const HOLD: &str = "hold";
        pub const METRICS_MISSING: &str = "metrics_missing";
        pub const METRICS_STALE: &str = "metrics_stale";
        pub const PROMETHEUS_UNAVAILABLE: &str = "prometheus_unavailable";
        pub const SCALE_TARGET_UNAVAILABLE: &str = "scale_target_unavailable";
        pub const INVALID_AUTOSCALING: &str = "invalid_autoscaling";

        /// The label of a step that acted: up if any tier grew, else down if any shrank.
        pub fn of_change(before: TierCounts, after: TierCounts) -> &'static str {
            let tiers = [Tier::Prefill, Tier::Decode];
            if tiers.iter().any(|t| after.get(*t) > before.get(*t)) {
                SCALE_UP
            } else if tiers.iter().any(|t| after.get(*t) < before.get(*t)) {
                SCALE_DOWN
            } else {
                HOLD
            }
        }

        /// The label of a step that did not act, from its `ScalingActive=False` reason.
        pub fn not_acting(reason: &str) -> &'static str {
            match reason {
                reasons::METRICS_MISSING => METRICS_MISSING,
                reasons::METRICS_STALE => METRICS_STALE,
                reasons::PROMETHEUS_UNAVAILABLE => PROMETHEUS_UNAVAILABLE,
                reasons::SCALE_TARGET_UNAVAILABLE => SCALE_TARGET_UNAVAILABLE,
                _ => INVALID_AUTOSCALING,
            }
        }
    }

    /// `metric` of `tandem_planner_observed_p90_seconds`.
    pub mod observed {
        pub const TTFT: &str = "ttft";
        pub const ITL: &str = "itl";
    }
}

/// Reconcile counters and durations, labelled so dashboards can split them.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `tandem_operator_reconcile_total{result}`: [`labels::result`].
    pub reconciles: IntCounterVec,
    /// `tandem_operator_reconcile_errors_total{category}`: [`labels::category`] (see
    /// `controller::Error::category`).
    pub errors: IntCounterVec,
    /// `tandem_operator_reconcile_duration_seconds`.
    pub duration: HistogramVec,
    /// `tandem_operator_child_applies_total{result}`: [`labels::apply`], one per child a
    /// reconcile applies or finds unchanged.
    pub child_applies: IntCounterVec,
    /// `tandem_operator_status_writes_total{result}`: [`labels::apply`], one per status a
    /// reconcile writes or finds unchanged.
    pub status_writes: IntCounterVec,
    /// `tandem_planner_desired_replicas{namespace,deployment,tier}`: the planner's last decision.
    pub planner_desired: GaugeVec,
    /// `tandem_planner_decisions_total{namespace,deployment,reason}`: [`labels::decision`]
    /// (`scale_up`, `scale_down`, `hold`, or why it did not act: `metrics_missing`,
    /// `metrics_stale`, `prometheus_unavailable`, `scale_target_unavailable`,
    /// `invalid_autoscaling`).
    pub planner_decisions: IntCounterVec,
    /// `tandem_planner_observed_p90_seconds{namespace,deployment,metric}`: the TTFT and ITL p90
    /// the last decision saw (`metric` is [`labels::observed`]: `ttft` or `itl`).
    pub planner_observed_p90: GaugeVec,
    /// `tandem_planner_max_replicas{namespace,deployment,tier}`: the tier's upper bound
    /// (`spec.autoscaling.<tier>.maxReplicas`; a tier the planner does not scale is pinned to
    /// its replicas).
    pub planner_max_replicas: GaugeVec,
    /// `tandem_planner_objective_seconds{namespace,deployment,metric}`: the TTFT and ITL p90
    /// objectives (`spec.autoscaling.slo`).
    pub planner_objective: GaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "tandem_operator_reconcile_total",
                "Reconciles of DisaggDeployments by result",
            ),
            &["result"],
        )
        .expect("valid metric");
        let errors = IntCounterVec::new(
            Opts::new(
                "tandem_operator_reconcile_errors_total",
                "Failed reconciles by error category",
            ),
            &["category"],
        )
        .expect("valid metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tandem_operator_reconcile_duration_seconds",
                "Time one reconcile took",
            )
            // Up to a minute: under a loaded API server a reconcile's dozen sequential calls
            // took over 10 s (the e2e scale test), which a 10 s top bucket can only call +Inf.
            // 2 s: the scale target for p99 (docs/benchmarks.md) is read off this bound.
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 30.0,
                60.0,
            ]),
            &[],
        )
        .expect("valid metric");
        let child_applies = IntCounterVec::new(
            Opts::new(
                "tandem_operator_child_applies_total",
                "Children applied, or skipped as unchanged in the watch cache",
            ),
            &["result"],
        )
        .expect("valid metric");
        let status_writes = IntCounterVec::new(
            Opts::new(
                "tandem_operator_status_writes_total",
                "DisaggDeployment status writes, or skipped as unchanged",
            ),
            &["result"],
        )
        .expect("valid metric");
        let planner_desired = GaugeVec::new(
            Opts::new(
                "tandem_planner_desired_replicas",
                "Replicas the planner last decided per tier",
            ),
            &["namespace", "deployment", "tier"],
        )
        .expect("valid metric");
        let planner_decisions = IntCounterVec::new(
            Opts::new(
                "tandem_planner_decisions_total",
                "Planner decisions by outcome, or by why it did not act",
            ),
            &["namespace", "deployment", "reason"],
        )
        .expect("valid metric");
        let planner_observed_p90 = GaugeVec::new(
            Opts::new(
                "tandem_planner_observed_p90_seconds",
                "TTFT and ITL p90 the planner's last decision read from Prometheus",
            ),
            &["namespace", "deployment", "metric"],
        )
        .expect("valid metric");
        let planner_max_replicas = GaugeVec::new(
            Opts::new(
                "tandem_planner_max_replicas",
                "Most replicas the planner may give a tier",
            ),
            &["namespace", "deployment", "tier"],
        )
        .expect("valid metric");
        let planner_objective = GaugeVec::new(
            Opts::new(
                "tandem_planner_objective_seconds",
                "The TTFT and ITL p90 objectives the planner scales to",
            ),
            &["namespace", "deployment", "metric"],
        )
        .expect("valid metric");
        for planner_metric in [
            Box::new(planner_desired.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(planner_decisions.clone()),
            Box::new(planner_observed_p90.clone()),
            Box::new(planner_max_replicas.clone()),
            Box::new(planner_objective.clone()),
            Box::new(child_applies.clone()),
            Box::new(status_writes.clone()),
        ] {
            registry.register(planner_metric).expect("registered once");
        }
        registry
            .register(Box::new(reconciles.clone()))
            .expect("registered once");
        registry
            .register(Box::new(errors.clone()))
            .expect("registered once");
        registry
            .register(Box::new(duration.clone()))
            .expect("registered once");
        Self {
            registry,
            reconciles,
            errors,
            duration,
            child_applies,
            status_writes,
            planner_desired,
            planner_decisions,
            planner_observed_p90,
            planner_max_replicas,
            planner_objective,
        }
    }

    /// The `tandem_planner_*` series of one planner step: its decision `label`
    /// ([`labels::decision`]), the p90s it read, the bounds and objectives of its `config`
    /// (when it has a valid one) and, when it decided, the replicas it chose.
    pub fn record_planner_step(
        &self,
        namespace: &str,
        deployment: &str,
        label: &str,
        observed_p90_s: (Option<f64>, Option<f64>),
        config: Option<&PlannerConfig>,
        desired: Option<TierCounts>,
    ) {
        if let Some(config) = config {
            for (metric, value) in [
                (labels::observed::TTFT, config.slo.ttft_p90_s),
                (labels::observed::ITL, config.slo.itl_p90_s),
            ] {
                self.planner_objective
                    .with_label_values(&[namespace, deployment, metric])
                    .set(value);
            }
            for (tier, bounds) in [
                (Tier::Prefill, config.prefill_bounds),
                (Tier::Decode, config.decode_bounds),
            ] {
                let tier_name = tier.to_string();
                self.planner_max_replicas
                    .with_label_values(&[namespace, deployment, tier_name.as_str()])
                    .set(f64::from(bounds.max));
            }
        }
        self.planner_decisions
            .with_label_values(&[namespace, deployment, label])
            .inc();
        for (metric, value) in [
            (labels::observed::TTFT, observed_p90_s.0),
            (labels::observed::ITL, observed_p90_s.1),
        ] {
            if let Some(value) = value {
                self.planner_observed_p90
                    .with_label_values(&[namespace, deployment, metric])
                    .set(value);
            }
        }
        if let Some(desired) = desired {
            for tier in [Tier::Prefill, Tier::Decode] {
                let tier_name = tier.to_string();
                self.planner_desired
                    .with_label_values(&[namespace, deployment, tier_name.as_str()])
                    .set(f64::from(desired.get(tier)));
            }
        }
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buf = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buf).expect("Prometheus text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_by_label_in_text_format() {
        let m = Metrics::new();
        m.reconciles.with_label_values(&[labels::result::OK]).inc();
        m.errors
            .with_label_values(&[labels::category::INVALID_SPEC])
            .inc_by(2);
        m.duration.with_label_values::<&str>(&[]).observe(0.03);
        let text = m.render();
        assert!(
            text.contains("tandem_operator_reconcile_total{result=\"ok\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_reconcile_errors_total{category=\"invalid_spec\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tandem_operator_reconcile_duration_seconds_bucket{le=\"0.05\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_planner_step_records_its_decision_bounds_and_objectives() {
        use crate::planner::{Slo, TierBounds};
        let m = Metrics::new();
        let config = PlannerConfig::new(
            Slo {
                ttft_p90_s: 0.5,
                itl_p90_s: 0.05,
            },
            TierBounds { min: 1, max: 4 },
            TierBounds { min: 2, max: 8 },
        );
        let before = TierCounts {
            prefill: 1,
            decode: 2,
        };
        let after = TierCounts {
            prefill: 2,
            decode: 2,
        };
        let label = labels::decision::of_change(before, after);
        assert_eq!(label, labels::decision::SCALE_UP);
        m.record_planner_step(
            "ns",
            "dd",
            label,
            (Some(0.9), None),
            Some(&config),
            Some(after),
        );
        let text = m.render();
        for line in [
            "tandem_planner_decisions_total{deployment=\"dd\",namespace=\"ns\",reason=\"scale_up\"} 1",
            "tandem_planner_desired_replicas{deployment=\"dd\",namespace=\"ns\",tier=\"prefill\"} 2",
            "tandem_planner_max_replicas{deployment=\"dd\",namespace=\"ns\",tier=\"decode\"} 8",
            "tandem_planner_objective_seconds{deployment=\"dd\",metric=\"ttft\",namespace=\"ns\"} 0.5",
            "tandem_planner_observed_p90_seconds{deployment=\"dd\",metric=\"ttft\",namespace=\"ns\"} 0.9",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        // No ITL p90 read: no series rather than a made-up value.
        assert!(!text.contains("metric=\"itl\",namespace=\"ns\"} 0\n"));
        assert_eq!(
            labels::decision::of_change(after, before),
            labels::decision::SCALE_DOWN
        );
        assert_eq!(
            labels::decision::of_change(after, after),
            labels::decision::HOLD
        );
    }

    #[test]
    fn a_step_that_did_not_act_is_labelled_by_its_reason_in_snake_case() {
        use crate::conditions::reasons;
        let snake = |reason: &str| {
            let mut out = String::new();
            for c in reason.chars() {
                if c.is_uppercase() && !out.is_empty() {
                    out.push('_');
                }
                out.push(c.to_ascii_lowercase());
            }
            out
        };
        for reason in [
            reasons::METRICS_MISSING,
            reasons::METRICS_STALE,
            reasons::PROMETHEUS_UNAVAILABLE,
            reasons::SCALE_TARGET_UNAVAILABLE,
            reasons::INVALID_AUTOSCALING,
        ] {
            assert_eq!(labels::decision::not_acting(reason), snake(reason));
        }
    }
}
