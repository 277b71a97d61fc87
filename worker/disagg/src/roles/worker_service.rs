//! `Worker.KvEvents` and `Worker.Load` over a worker's engine: what routers
//! and decode workers learn about it.

use std::pin::Pin;

use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::transfer::pb::{self, kv_event};
use tandem_engine::block_manager::KvEvent;
use tandem_engine::EngineHandle;

/// The `Worker` gRPC service of one engine.
pub struct WorkerService {
    engine: EngineHandle,
    transfer: TransferInfo,
}

/// What a worker tells peers about KV transfer in its load reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferInfo {
    /// See [`crate::transfer::cuda_ipc::node_id`].
    pub node_id: String,
    /// Takes (prefill) or offers (decode) KV over CUDA IPC.
    pub cuda_ipc: bool,
}

impl TransferInfo {
    /// This node, and cuda-ipc when the engine's pool can be shared (CUDA).
    pub fn of(engine: &EngineHandle) -> Self {
        Self {
            node_id: crate::transfer::cuda_ipc::node_id(),
            cuda_ipc: engine.kv_pool_export().is_some(),
        }
    }
}

impl WorkerService {
    pub fn server(engine: EngineHandle) -> pb::worker_server::WorkerServer<Self> {
        let transfer = TransferInfo::of(&engine);
        Self::server_with(engine, transfer)
    }

    pub fn server_with(
        engine: EngineHandle,
        transfer: TransferInfo,
    ) -> pb::worker_server::WorkerServer<Self> {
        pb::worker_server::WorkerServer::new(Self { engine, transfer })
    }
}

/// The load report of an engine right now.
pub fn load_report(engine: &EngineHandle, transfer: &TransferInfo) -> pb::LoadResponse {
    let stats = engine.stats();
    pb::LoadResponse {
        queue_depth: stats.waiting as u32,
        running_sequences: stats.running as u32,
        free_blocks: stats.kv_blocks_total.saturating_sub(stats.kv_blocks_used) as u32,
        total_blocks: stats.kv_blocks_total as u32,
        active_blocks: stats.kv_blocks_used as u32,
        max_queue: engine.max_queue() as u32,
        block_size: engine.block_size() as u32,
        node_id: transfer.node_id.clone(),
        cuda_ipc: transfer.cuda_ipc,
    }
}

pub fn kv_event_to_pb(event: &KvEvent) -> pb::KvEvent {
    let event = match event {
        KvEvent::Stored { hashes } => kv_event::Event::Stored(pb::BlockHashes {
            hashes: hashes.clone(),
        }),
        KvEvent::Removed { hashes } => kv_event::Event::Removed(pb::BlockHashes {
            hashes: hashes.clone(),
        }),
    };
    pb::KvEvent { event: Some(event) }
}

pub fn kv_event_from_pb(event: pb::KvEvent) -> Option<KvEvent> {
    Some(match event.event? {
        kv_event::Event::Stored(b) => KvEvent::Stored { hashes: b.hashes },
        kv_event::Event::Removed(b) => KvEvent::Removed { hashes: b.hashes },
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::KvEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type KvEventsStream = EventStream;

    async fn kv_events(
        &self,
        _request: Request<pb::KvEventsRequest>,
    ) -> Result<Response<Self::KvEventsStream>, Status> {
        let rx = self.engine.subscribe_kv_events();
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(event) => Some((Ok(kv_event_to_pb(&event)), rx)),
                // A subscriber that fell behind has an index it cannot trust:
                // end the stream; it reconnects and starts from a clean slate.
                Err(RecvError::Lagged(n)) => Some((
                    Err(Status::data_loss(format!(
                        "{n} KV events were dropped; reconnect to resynchronise"
                    ))),
                    rx,
                )),
                Err(RecvError::Closed) => None,
            }
        });
        // End after the first error (unfold would go on receiving).
        let stream = futures::StreamExt::scan(stream, false, |failed, item| {
            let out = if *failed { None } else { Some(item) };
            if let Some(Err(_)) = &out {
                *failed = true;
            }
            futures::future::ready(out)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn load(
        &self,
        _request: Request<pb::LoadRequest>,
    ) -> Result<Response<pb::LoadResponse>, Status> {
        Ok(Response::new(load_report(&self.engine, &self.transfer)))
    }
}
