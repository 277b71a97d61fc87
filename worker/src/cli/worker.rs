//! `tandem prefill` and `tandem decode`: an engine behind gRPC, with an HTTP
//! port for `/health` and `/metrics`.
//!
//! Start-up order: both ports are bound first (the log names them), `/health`
//! answers 503 while the weights load, then the gRPC services start and
//! `/health` turns 200. SIGTERM/SIGINT: `/health` turns 503, in-flight calls
//! get up to `--shutdown-grace-secs` to finish, then the process exits 0.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::common::{self, EngineArgs, ModelHttpArgs};
use crate::engine::EngineHandle;
use crate::roles::decode::{
    DecodeConfig, DecodeService, DecodeWorker, DEFAULT_REMOTE_PREFILL_MIN_TOKENS,
};
use crate::roles::http::{self as worker_http, WorkerHealth};
use crate::roles::worker_service::{TransferInfo, WorkerService};
use crate::transfer::cuda_ipc::KvTransferMode;
use crate::transfer::grpc::{incoming, server_builder, PrefillService};

/// Default `--grpc-port` (the operator's headless Services use it too).
pub const DEFAULT_GRPC_PORT: u16 = 9000;

/// KV transports a worker can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KvTransfer {
    /// `cuda-ipc` when prefill and decode both use CUDA on the same node
    /// (decided per peer), else gRPC.
    Auto,
    /// Streamed gRPC messages: works between any two hosts.
    Grpc,
    /// The prefill worker writes the KV straight into the decode worker's GPU
    /// pool; only for workers on one node, both on CUDA. A decode worker does
    /// not use prefill workers it cannot reach this way.
    CudaIpc,
}

impl KvTransfer {
    pub fn mode(self) -> KvTransferMode {
        match self {
            KvTransfer::Auto => KvTransferMode::Auto,
            KvTransfer::Grpc => KvTransferMode::Grpc,
            KvTransfer::CudaIpc => KvTransferMode::CudaIpc,
        }
    }
}

/// The `Load` report's transfer fields for a worker in `mode`; refuses a
/// forced cuda-ipc on an engine whose pool cannot be shared.
fn transfer_info(engine: &EngineHandle, mode: KvTransferMode) -> anyhow::Result<TransferInfo> {
    let mut info = TransferInfo::of(engine);
    if mode == KvTransferMode::CudaIpc && !info.cuda_ipc {
        anyhow::bail!(
            "--kv-transfer cuda-ipc needs the KV pool on a CUDA device (--device cuda[:N])"
        );
    }
    info.cuda_ipc &= mode != KvTransferMode::Grpc;
    Ok(info)
}

/// Flags of every engine-owning worker role.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub http: ModelHttpArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// gRPC port for the worker protocol (0 picks a free one; the log says which).
    #[arg(long, env = "TANDEM_GRPC_PORT", default_value_t = DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,

    /// How prompt KV travels from prefill to decode workers.
    #[arg(long, env = "TANDEM_KV_TRANSFER", value_enum, default_value = "auto")]
    pub kv_transfer: KvTransfer,
}

/// `tandem prefill`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// `tandem decode`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,

    /// Prefill workers' gRPC addresses (`host:port`, comma-separated), for
    /// `--discovery static`. None: every prompt is prefilled locally.
    #[arg(long, env = "TANDEM_PREFILL_WORKERS", value_delimiter = ',')]
    pub prefill_workers: Vec<String>,

    #[command(flatten)]
    pub discovery: super::discovery_args::PrefillDiscoveryArgs,

    /// Prompts with fewer tokens missing from this worker's prefix cache are
    /// prefilled here rather than on a prefill worker.
    #[arg(long, env = "TANDEM_REMOTE_PREFILL_MIN_TOKENS", default_value_t = DEFAULT_REMOTE_PREFILL_MIN_TOKENS)]
    pub remote_prefill_min_tokens: usize,

    /// A prefill worker with this many requests waiting has no room; prompts
    /// are then prefilled locally.
    #[arg(long, env = "TANDEM_PREFILL_MAX_QUEUE", default_value_t = DecodeConfig::default().prefill_max_queue)]
    pub prefill_max_queue: usize,

    /// Seconds without a message after which a KV transfer is abandoned (the
    /// prompt is then prefilled elsewhere).
    #[arg(long, env = "TANDEM_KV_TRANSFER_TIMEOUT_SECS", default_value_t = DecodeConfig::default().transfer_timeout.as_secs_f64())]
    pub kv_transfer_timeout_secs: f64,
}

pub fn run_prefill(args: PrefillArgs) -> anyhow::Result<()> {
    let mode = args.worker.kv_transfer.mode();
    common::runtime()?.block_on(run_worker(
        args.worker,
        "prefill",
        move |engine, mut routes| {
            let info = transfer_info(&engine, mode)?;
            let cuda_ipc_off = (!info.cuda_ipc).then(|| match mode {
                KvTransferMode::Grpc => {
                    "this prefill worker runs with --kv-transfer grpc".to_string()
                }
                _ => "this prefill worker's KV pool is not on a CUDA device".to_string(),
            });
            routes
                .add_service(PrefillService::server_with(engine.clone(), cuda_ipc_off))
                .add_service(WorkerService::server_with(engine, info));
            Ok(routes)
        },
    ))
}

pub fn run_decode(args: DecodeArgs) -> anyhow::Result<()> {
    let config = DecodeConfig {
        remote_prefill_min_tokens: args.remote_prefill_min_tokens,
        prefill_max_queue: args.prefill_max_queue,
        transfer_timeout: Duration::try_from_secs_f64(args.kv_transfer_timeout_secs)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--kv-transfer-timeout-secs must be a positive number of seconds")?,
        kv_transfer: args.worker.kv_transfer.mode(),
        ..DecodeConfig::default()
    };
    let prefill_workers = args.prefill_workers.clone();
    let discovery = args.discovery.clone();
    common::runtime()?.block_on(async move {
        let membership = discovery.membership(&prefill_workers).await?;
        run_worker(args.worker, "decode", move |engine, mut routes| {
            let info = transfer_info(&engine, config.kv_transfer)?;
            let worker = DecodeWorker::start(engine.clone(), config, membership)?;
            routes
                .add_service(DecodeService::server(worker))
                .add_service(WorkerService::server_with(engine, info));
            Ok(routes)
        })
        .await
    })
}

async fn run_worker(
    args: WorkerArgs,
    role: &'static str,
    services: impl FnOnce(
        EngineHandle,
        tonic::service::RoutesBuilder,
    ) -> anyhow::Result<tonic::service::RoutesBuilder>,
) -> anyhow::Result<()> {
    let model = common::resolve_model(&args.http)?;
    let max_model_len = model.max_model_len;

    let http_addr = args.http.listen_address();
    let http_listener = TcpListener::bind(&http_addr)
        .await
        .with_context(|| format!("binding {http_addr} (--port)"))?;
    let grpc_addr = format!("{}:{}", args.http.host, args.grpc_port);
    let grpc_listener = TcpListener::bind(&grpc_addr)
        .await
        .with_context(|| format!("binding {grpc_addr} (--grpc-port)"))?;
    let http_local: SocketAddr = http_listener.local_addr()?;
    let grpc_local: SocketAddr = grpc_listener.local_addr()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        role,
        http = %http_local,
        grpc = %grpc_local,
        model = %model.info.name,
        path = %model.path.display(),
        "listening; loading the model (/health answers 503 until ready)"
    );

    let health = WorkerHealth::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let http = tokio::spawn(
        axum::serve(http_listener, worker_http::router(health.clone()))
            .with_graceful_shutdown(stopped())
            .into_future(),
    );
    let signal = {
        let health = health.clone();
        tokio::spawn(async move {
            common::shutdown_signal().await;
            health.begin_draining();
            let _ = stop_tx.send(true);
        })
    };

    let loading = tokio::task::spawn_blocking({
        let engine_args = args.engine.clone();
        let path = model.path.clone();
        move || common::load_engine(&path, &engine_args, max_model_len, role)
    });
    let loaded = tokio::select! {
        loaded = loading => loaded.context("model loading panicked")??,
        () = stopped() => {
            tracing::info!("stopped before the model finished loading");
            return Ok(());
        }
    };
    let engine = loaded.engine;
    let routes = services(engine.clone(), tonic::service::RoutesBuilder::default())?;
    let grpc = tokio::spawn(
        server_builder()
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming(grpc_listener), stopped()),
    );
    health.set_engine(Arc::new(engine));
    // Auto is decided per peer (the decode worker logs each choice).
    let kv_transfer = match args.kv_transfer {
        KvTransfer::Auto => "auto",
        KvTransfer::Grpc => "grpc",
        KvTransfer::CudaIpc => "cuda-ipc",
    };
    tracing::info!(role, http = %http_local, grpc = %grpc_local, max_model_len, kv_transfer, "ready");

    stopped().await;
    let grace = Duration::from_secs(args.http.shutdown_grace_secs);
    tracing::info!(
        grace_secs = grace.as_secs(),
        "shutting down: draining in-flight calls"
    );
    let drained = async {
        let _ = grpc.await;
        let _ = http.await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!("shutdown grace period elapsed; dropping calls still in flight");
    }
    signal.abort();
    tracing::info!("shut down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::backend::{CpuBackend, WeightStorage};
    use crate::engine::{Engine, EngineConfig};
    use crate::model::testing::{random_weights, tiny_config};
    use crate::model::Architecture;

    fn cpu_engine() -> EngineHandle {
        let cfg = tiny_config(Architecture::Llama);
        let w = random_weights(&cfg, 1);
        let backend = CpuBackend::new(cfg, &w, WeightStorage::F32).unwrap();
        let ecfg = EngineConfig {
            num_blocks: Some(8),
            threads: 1,
            ..EngineConfig::default()
        };
        Engine::start(Box::new(backend), ecfg, vec![0], 64, "test").unwrap()
    }

    #[test]
    fn a_cpu_worker_never_offers_cuda_ipc_and_refuses_to_be_forced() {
        let engine = cpu_engine();
        for mode in [KvTransferMode::Auto, KvTransferMode::Grpc] {
            let info = transfer_info(&engine, mode).unwrap();
            assert!(!info.cuda_ipc, "{mode:?}");
            assert_eq!(info.node_id, crate::transfer::cuda_ipc::node_id());
        }
        let err = transfer_info(&engine, KvTransferMode::CudaIpc)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--kv-transfer cuda-ipc needs the KV pool on a CUDA device"),
            "{err}"
        );
    }
}
