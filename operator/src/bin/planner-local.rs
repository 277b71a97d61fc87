//! `planner-local`: the planner driving a `tandem local` deployment. Every interval it reads the
//! deployment's series from Prometheus, decides with the operator's own decision function, resizes
//! the tiers through `tandem local`'s control endpoint, and logs the decision and its reason in
//! one line.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tandem_operator::metrics::Metrics;
use tandem_operator::planner::local::{LocalPlanner, LocalTarget};
use tandem_operator::planner::{PlannerConfig, Slo, TierBounds};
use tandem_operator::prometheus::{PrometheusSource, Scope};

/// Autoscale a `tandem local` deployment's prefill and decode tiers from latency SLOs.
///
/// Start `tandem local` with `--control-port P --prometheus-sd-file F`, a Prometheus whose
/// `file_sd_configs` reads F (scrape interval a few seconds or less), then
/// `planner-local --prometheus http://127.0.0.1:9090 --control http://127.0.0.1:P
/// --ttft-p90-ms 500 --itl-p90-ms 50`. `make run-autoscaled` does all three.
///
/// Each interval: p90 TTFT and ITL, request rate, mean input and output tokens, prefill queue
/// depth, decode KV utilization and served tokens/s over the last --window-secs, for the series
/// labelled namespace=--namespace, deployment=--deployment. A tier over its SLO (prefill for
/// TTFT, decode for ITL) grows; one comfortably under (--scale-down-below) that its learned
/// throughput model says can carry the load with fewer replicas shrinks; no traffic shrinks to
/// the minimum. Missing or stale metrics change nothing. docs/autoscaling.md explains every knob.
#[derive(Debug, Parser)]
#[command(name = "planner-local", version)]
struct Args {
    /// Prometheus base URL.
    #[arg(long, env = "TANDEM_PLANNER_PROMETHEUS")]
    prometheus: String,
    /// Base URL of `tandem local --control-port` (e.g. http://127.0.0.1:9100).
    #[arg(long, env = "TANDEM_PLANNER_CONTROL")]
    control: String,
    /// `namespace` label of the deployment's series (`tandem local --namespace`).
    #[arg(long, default_value = "local")]
    namespace: String,
    /// `deployment` label of the deployment's series (`tandem local --deployment`).
    #[arg(long, default_value = "local")]
    deployment: String,

    /// TTFT p90 target in milliseconds (the prefill tier's SLO).
    #[arg(long)]
    ttft_p90_ms: f64,
    /// ITL p90 target in milliseconds (the decode tier's SLO).
    #[arg(long)]
    itl_p90_ms: f64,
    /// Fewest prefill workers the planner runs.
    #[arg(long, default_value_t = 1)]
    prefill_min: u32,
    /// Most prefill workers the planner runs.
    #[arg(long, default_value_t = 4)]
    prefill_max: u32,
    /// Fewest decode workers the planner runs.
    #[arg(long, default_value_t = 1)]
    decode_min: u32,
    /// Most decode workers the planner runs.
    #[arg(long, default_value_t = 4)]
    decode_max: u32,

    /// Seconds between decisions.
    #[arg(long, default_value_t = 10.0)]
    interval_secs: f64,
    /// Range of the rate() and histogram_quantile() queries, whole seconds; should span a few
    /// scrapes [default: 2 × interval].
    #[arg(long)]
    window_secs: Option<u64>,
    /// Metrics older than this are stale: no action [default: 2 × interval].
    #[arg(long)]
    max_staleness_secs: Option<f64>,
    /// A scale-up must be recommended for this long (the lowest recommendation wins).
    #[arg(long, default_value_t = knob_defaults().scale_up_stabilization_s)]
    scale_up_stabilization_secs: f64,
    /// A scale-down must be recommended for this long (the highest recommendation wins).
    #[arg(long, default_value_t = knob_defaults().scale_down_stabilization_s)]
    scale_down_stabilization_secs: f64,
    /// A tier that changed holds this long (a scale-up may still follow a scale-up).
    #[arg(long, default_value_t = knob_defaults().cooldown_s)]
    cooldown_secs: f64,
    /// Largest increase per decision, as a fraction of the current replicas.
    #[arg(long, default_value_t = knob_defaults().max_step_up_fraction)]
    max_step_up_fraction: f64,
    /// An increase of this many replicas is always allowed, whatever the fraction.
    #[arg(long, default_value_t = knob_defaults().scale_up_min_step)]
    scale_up_min_step: u32,
    /// Largest decrease per decision, as a fraction of the current replicas.
    #[arg(long, default_value_t = knob_defaults().max_step_down_fraction)]
    max_step_down_fraction: f64,
    /// Tiers are sized for their p90 at this fraction of the SLO (headroom).
    #[arg(long, default_value_t = knob_defaults().target_latency_fraction)]
    target_latency_fraction: f64,
    /// Scale down only while the p90 is under this fraction of the SLO.
    #[arg(long, default_value_t = knob_defaults().scale_down_below)]
    scale_down_below: f64,
    /// Seconds ahead a rising request rate is projected when scaling up.
    #[arg(long, default_value_t = knob_defaults().lookahead_s)]
    lookahead_secs: f64,
    /// Seconds from asking for a replica to it serving (a local worker: loading the model).
    #[arg(long, default_value_t = knob_defaults().replica_startup_s)]
    replica_startup_secs: f64,
    /// Seconds in which a prefill backlog should drain once new replicas serve.
    #[arg(long, default_value_t = knob_defaults().backlog_drain_s)]
    backlog_drain_secs: f64,
    /// Keep prefill replicas per decode replica within LOW:HIGH (e.g. 0.5:2).
    #[arg(long, value_parser = parse_ratio)]
    prefill_per_decode: Option<(f64, f64)>,

    /// Serve the operator's `tandem_planner_*` series for each step on
    /// http://127.0.0.1:PORT/metrics (0 picks a free port; the log says which), so the
    /// dashboard's planner panels and the alerts work over `tandem local` too.
    #[arg(long)]
    metrics_port: Option<u16>,
}

/// The planner's own defaults for the knobs this binary does not change (the SLO and
/// bounds passed here only fill the required fields).
fn knob_defaults() -> PlannerConfig {
    PlannerConfig::new(
        Slo {
            ttft_p90_s: 1.0,
            itl_p90_s: 1.0,
        },
        TierBounds { min: 1, max: 1 },
        TierBounds { min: 1, max: 1 },
    )
}

fn parse_ratio(value: &str) -> Result<(f64, f64), String> {
    let (low, high) = value
        .split_once(':')
        .ok_or_else(|| format!("{value:?} is not LOW:HIGH"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<f64>()
            .map_err(|_| format!("{s:?} in {value:?} is not a number"))
    };
    Ok((number(low)?, number(high)?))
}

impl Args {
    fn config(&self) -> PlannerConfig {
        let mut config = PlannerConfig::new(
            Slo {
                ttft_p90_s: self.ttft_p90_ms / 1e3,
                itl_p90_s: self.itl_p90_ms / 1e3,
            },
            TierBounds {
                min: self.prefill_min,
                max: self.prefill_max,
            },
            TierBounds {
                min: self.decode_min,
                max: self.decode_max,
            },
        );
        config.interval_s = self.interval_secs;
        config.max_staleness_s = self.max_staleness_secs.unwrap_or(2.0 * self.interval_secs);
        config.scale_up_stabilization_s = self.scale_up_stabilization_secs;
        config.scale_down_stabilization_s = self.scale_down_stabilization_secs;
        config.cooldown_s = self.cooldown_secs;
        config.max_step_up_fraction = self.max_step_up_fraction;
        config.scale_up_min_step = self.scale_up_min_step;
        config.max_step_down_fraction = self.max_step_down_fraction;
        config.target_latency_fraction = self.target_latency_fraction;
        config.scale_down_below = self.scale_down_below;
        config.lookahead_s = self.lookahead_secs;
        config.replica_startup_s = self.replica_startup_secs;
        config.backlog_drain_s = self.backlog_drain_secs;
        config.prefill_per_decode = self.prefill_per_decode;
        config
    }

    fn scope(&self) -> Scope {
        Scope {
            namespace: self.namespace.clone(),
            deployment: self.deployment.clone(),
            window_s: self
                .window_secs
                .unwrap_or((2.0 * self.interval_secs).ceil() as u64),
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let args = Args::parse();
    let mut planner = LocalPlanner::new(
        PrometheusSource::new(&args.prometheus)?,
        args.scope(),
        LocalTarget::new(&args.control)?,
        args.config(),
    )?;
    tracing::info!(
        prometheus = %args.prometheus,
        control = %args.control,
        namespace = %args.namespace,
        deployment = %args.deployment,
        interval = ?Duration::from_secs_f64(args.interval_secs),
        "planner-local started"
    );
    let metrics = Metrics::new();
    if let Some(port) = args.metrics_port {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("binding --metrics-port {port}"))?;
        tracing::info!(metrics = %listener.local_addr()?, "serving /metrics");
        let served = metrics.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let served = served.clone();
                async move { served.render() }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!("metrics server: {e}");
            }
        });
    }
    let (namespace, deployment) = (args.namespace.clone(), args.deployment.clone());
    let config = args.config();
    planner
        .run(shutdown_signal(), |outcome| match outcome {
            Ok(step) => {
                step.record(&metrics, &config, &namespace, &deployment);
                tracing::info!("{step}")
            }
            Err(e) => {
                e.record(&metrics, &config, &namespace, &deployment);
                tracing::warn!("no decision: {e}")
            }
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> Args {
        let base = [
            "planner-local",
            "--prometheus",
            "http://127.0.0.1:9090",
            "--control",
            "http://127.0.0.1:9100",
            "--ttft-p90-ms",
            "500",
            "--itl-p90-ms",
            "50",
        ];
        Args::try_parse_from(base.iter().chain(extra)).unwrap()
    }

    #[test]
    fn unset_knobs_are_the_planners_defaults() {
        let args = parse(&[]);
        let mut expected = PlannerConfig::new(
            Slo {
                ttft_p90_s: 0.5,
                itl_p90_s: 0.05,
            },
            TierBounds { min: 1, max: 4 },
            TierBounds { min: 1, max: 4 },
        );
        // Local processes start in seconds and Prometheus scrapes them often: a shorter interval.
        expected.interval_s = 10.0;
        expected.max_staleness_s = 20.0;
        assert_eq!(args.config(), expected);
        assert_eq!(args.scope().window_s, 20);
        assert_eq!(args.scope().deployment, "local");
    }

    #[test]
    fn knobs_map_to_the_config() {
        let args = parse(&[
            "--interval-secs",
            "5",
            "--cooldown-secs",
            "15",
            "--scale-down-stabilization-secs",
            "20",
            "--prefill-max",
            "2",
            "--prefill-per-decode",
            "0.5:2",
        ]);
        let config = args.config();
        assert_eq!(config.interval_s, 5.0);
        assert_eq!(config.max_staleness_s, 10.0);
        assert_eq!(config.cooldown_s, 15.0);
        assert_eq!(config.scale_down_stabilization_s, 20.0);
        assert_eq!(config.prefill_bounds, TierBounds { min: 1, max: 2 });
        assert_eq!(config.prefill_per_decode, Some((0.5, 2.0)));
        assert_eq!(args.scope().window_s, 10);
        assert!(parse_ratio("2").unwrap_err().contains("LOW:HIGH"));
    }
}
