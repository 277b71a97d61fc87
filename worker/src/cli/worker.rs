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

pub use tandem_api::args::{DecodeArgs, PrefillArgs, WorkerArgs, DEFAULT_GRPC_PORT};
use tandem_engine::EngineHandle;

use super::common;
use tandem_disagg::roles::decode::{DecodeConfig, DecodeService, DecodeWorker};
use tandem_disagg::roles::http::{self as worker_http, WorkerHealth};
use tandem_disagg::roles::worker_service::{TransferInfo, WorkerService};
use tandem_disagg::transfer::channel::{incoming, server_builder};
use tandem_disagg::transfer::cuda_ipc::KvTransfer;
use tandem_disagg::transfer::service::PrefillService;

/// The `Load` report's transfer fields for a worker in `mode`; refuses a
/// forced cuda-ipc on an engine whose pool cannot be shared.
fn transfer_info(engine: &EngineHandle, mode: KvTransfer) -> anyhow::Result<TransferInfo> {
    let mut info = TransferInfo::of(engine);
    if mode == KvTransfer::CudaIpc && !info.cuda_ipc {
        anyhow::bail!(
            "--kv-transfer cuda-ipc needs the KV pool on a CUDA device (--device cuda[:N])"
        );
    }
    info.cuda_ipc &= mode != KvTransfer::Grpc;
    Ok(info)
}

pub fn run_prefill(args: PrefillArgs) -> anyhow::Result<()> {
    let mode = args.worker.kv_transfer;
    common::runtime()?.block_on(run_worker(
        args.worker,
        "prefill",
        move |engine, mut routes| {
            let info = transfer_info(&engine, mode)?;
            let cuda_ipc_off = (!info.cuda_ipc).then(|| match mode {
                KvTransfer::Grpc => "this prefill worker runs with --kv-transfer grpc".to_string(),
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
        kv_transfer: args.worker.kv_transfer,
        ..DecodeConfig::default()
    };
    let prefill_workers = args.prefill_workers.clone();
    let discovery = args.discovery.clone();
    common::runtime()?.block_on(async move {
        let membership =
            super::discovery_args::prefill_membership(&discovery, &prefill_workers).await?;
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
    common::configure_metrics(&args.http, &model.info.name);

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
    use tandem_engine::backend::{CpuBackend, WeightStorage};
    use tandem_engine::{Engine, EngineConfig};
    use tandem_model::testing::{random_weights, tiny_config};
    use tandem_model::Architecture;

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
        for mode in [KvTransfer::Auto, KvTransfer::Grpc] {
            let info = transfer_info(&engine, mode).unwrap();
            assert!(!info.cuda_ipc, "{mode:?}");
            assert_eq!(info.node_id, tandem_disagg::transfer::cuda_ipc::node_id());
        }
        let err = transfer_info(&engine, KvTransfer::CudaIpc)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--kv-transfer cuda-ipc needs the KV pool on a CUDA device"),
            "{err}"
        );
    }
}
