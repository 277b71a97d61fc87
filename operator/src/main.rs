//! `tandem-operator`: flags, logging, the metrics/health server, leader election, then the
//! controller. The wiring lives in the library.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use clap::Parser;
use kube::runtime::events::Reporter;
use tandem_operator::controller::{self, Context};
use tandem_operator::leader::LeaseLock;
use tandem_operator::metrics::Metrics;
use tracing::{error, info, warn};

#[derive(Debug, Parser)]
#[command(
    name = "tandem-operator",
    version,
    about = "Reconciles Tandem DisaggDeployments"
)]
struct Args {
    /// Reconcile DisaggDeployments in this namespace only (default: all namespaces).
    #[arg(long, env = "TANDEM_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Port of /metrics, /healthz and /readyz.
    #[arg(long, env = "TANDEM_OPERATOR_METRICS_PORT", default_value_t = 8080)]
    metrics_port: u16,
    /// Log format: json (one object per line) or text.
    #[arg(long, env = "TANDEM_OPERATOR_LOG_FORMAT", default_value = "json", value_parser = ["json", "text"])]
    log_format: String,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "TANDEM_OPERATOR_LEASE_NAME",
        default_value = "tandem-operator"
    )]
    lease_name: String,
    /// This replica's identity in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    lease_holder: Option<String>,
    /// Seconds a leader may go without renewing before a standby takes over.
    #[arg(long, env = "TANDEM_OPERATOR_LEASE_SECONDS", default_value_t = 15)]
    lease_seconds: u64,
    /// Reconciles in flight at once (0: no bound). Each makes up to a dozen API calls; the bound
    /// keeps a burst of new deployments from queueing the API server past its timeouts.
    #[arg(
        long,
        env = "TANDEM_OPERATOR_MAX_CONCURRENT_RECONCILES",
        default_value_t = 8
    )]
    max_concurrent_reconciles: u16,
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    ready: Arc<AtomicBool>,
}

async fn serve_http(port: u16, state: HttpState) -> anyhow::Result<()> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|State(s): State<HttpState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(|State(s): State<HttpState>| async move {
                if s.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not connected to the API server yet",
                    )
                }
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
        .await
        .with_context(|| format!("binding the metrics port {port}"))?;
    axum::serve(listener, app).await.context("metrics server")
}

/// Resolves on SIGTERM (what Kubernetes sends) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => drop(tokio::signal::ctrl_c().await),
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole cause chain, no backtrace: this is what `kubectl logs` shows.
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log_format);
    info!(version = env!("CARGO_PKG_VERSION"), namespace = ?args.namespace, "starting tandem-operator");

    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let metrics = Metrics::new();
    let ready = Arc::new(AtomicBool::new(false));
    let http = tokio::spawn(serve_http(
        args.metrics_port,
        HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));

    let holder = args
        .lease_holder
        .clone()
        .unwrap_or_else(|| format!("tandem-operator-{}", std::process::id()));
    let lock = Arc::new(LeaseLock::new(
        client.clone(),
        &args.lease_namespace,
        &args.lease_name,
        &holder,
        Duration::from_secs(args.lease_seconds),
    ));
    let retry = lock.duration() / 3;

    // Stand by until this replica leads (or a signal asks it to stop).
    let acquired = async {
        loop {
            match lock.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => ready.store(true, Ordering::Relaxed),
                Err(e) => warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(retry).await;
        }
    };
    tokio::select! {
        _ = acquired => {}
        _ = shutdown_signal() => { info!("stopping before leading"); return Ok(()) }
    }
    ready.store(true, Ordering::Relaxed);
    info!(holder, lease = args.lease_name, "leading");

    // Renew in the background; losing the Lease ends the process so a restart re-elects. A
    // leader that cannot renew for a whole lease duration steps down too: by then a standby may
    // hold the Lease, and two replicas must never reconcile at once.
    let renew_lock = lock.clone();
    let renewal = tokio::spawn(async move {
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(retry).await;
            match renew_lock.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => return anyhow::anyhow!("lost the leader Lease to another replica"),
                Err(e) => warn!(error = %e, "renewing the leader Lease"),
            }
            if last_renewed.elapsed() >= renew_lock.duration() {
                return anyhow::anyhow!(
                    "could not renew the leader Lease for {:?}",
                    renew_lock.duration()
                );
            }
        }
    });

    let reporter = Reporter {
        controller: "tandem-operator".into(),
        instance: Some(holder.clone()),
    };
    let ctx = Arc::new(Context::new(client, reporter, metrics));
    tokio::select! {
        _ = controller::run(ctx, args.namespace.clone(), args.max_concurrent_reconciles) => info!("controller stopped"),
        lost = renewal => {
            let e = match lost {
                Ok(e) => e,
                Err(join) => anyhow::Error::from(join).context("lease renewal task"),
            };
            error!(error = %e, "stepping down");
            return Err(e);
        }
        res = http => return res.context("metrics server task")?,
    }
    if let Err(e) = lock.release().await {
        warn!(error = %e, "releasing the leader Lease");
    }
    Ok(())
}
