//! The decode worker's `Decode.Generate`: admits a request, has its prompt
//! prefilled remotely or locally, and streams the tokens back.
//!
//! Conditional disaggregation (docs/architecture.md, "Request flow", step 3): the prompt
//! goes to a prefill worker only when at least `remote_prefill_min_tokens` of
//! it are not in this worker's prefix cache and some prefill worker has room
//! (fewer than `prefill_max_queue` requests waiting). A remote prefill that
//! fails or stalls is retried on another prefill worker, then done locally:
//! the request succeeds either way. A caller that goes away cancels the
//! prefill (remote or local) and the decode, and frees their blocks.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::pool::{PoolConfig, WorkerPool};
use super::{event_to_pb, request_from_pb};
use crate::router::{PrefixIndex, Router, RouterConfig, WorkerId};
use crate::transfer::client::{IpcPrefill, PrefillClient};
use crate::transfer::cuda_ipc::{self, Choice, KvTransfer};
use crate::transfer::pb;
use crate::transfer::rpc::status_of;
use crate::transfer::{RemotePrefillRequest, TransferError};
use tandem_api::infer::{GenerateStream, Infer, InferError};
use tandem_api::metrics::metrics;
use tandem_api::types::{FinishReason, GenerateEvent, GenerateRequest};
use tandem_engine::EngineHandle;

/// The `role` label of the decode worker's metrics.
pub const ROLE: &str = "decode";

/// When and where a decode worker prefills.
#[derive(Debug, Clone)]
pub struct DecodeConfig {
    /// Prompts with fewer uncached tokens are prefilled locally.
    pub remote_prefill_min_tokens: usize,
    /// A prefill worker with this many requests waiting has no room.
    pub prefill_max_queue: usize,
    /// Prefill workers tried for one prompt before prefilling locally.
    pub prefill_attempts: usize,
    /// A transfer with no message for this long is abandoned.
    pub transfer_timeout: Duration,
    /// Whether to offer prefill workers this worker's KV pool (cuda-ipc).
    pub kv_transfer: KvTransfer,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            remote_prefill_min_tokens: DEFAULT_REMOTE_PREFILL_MIN_TOKENS,
            prefill_max_queue: DEFAULT_PREFILL_MAX_QUEUE,
            prefill_attempts: 2,
            transfer_timeout: DEFAULT_KV_TRANSFER_TIMEOUT,
            kv_transfer: KvTransfer::Auto,
        }
    }
}

pub use tandem_api::args::DEFAULT_REMOTE_PREFILL_MIN_TOKENS;
use tandem_api::args::{DEFAULT_KV_TRANSFER_TIMEOUT, DEFAULT_PREFILL_MAX_QUEUE};

/// Where a prompt was prefilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillLocation {
    Remote,
    Local,
}

impl PrefillLocation {
    pub fn as_str(self) -> &'static str {
        match self {
            PrefillLocation::Remote => "remote",
            PrefillLocation::Local => "local",
        }
    }
}

/// A decode worker: its engine, its prefill workers, its own prefix index.
pub struct DecodeWorker {
    engine: EngineHandle,
    config: DecodeConfig,
    prefill: Arc<WorkerPool<PrefillClient>>,
    /// Which blocks this worker's engine holds (from its own KV events): how
    /// much of a prompt is already cached here.
    local_cache: Arc<Mutex<PrefixIndex>>,
    /// This machine (see [`cuda_ipc::node_id`]): cuda-ipc needs the peer on it.
    node_id: String,
    /// How the KV comes back from each prefill worker, as last logged (each
    /// change is logged).
    logged_choice: Mutex<HashMap<WorkerId, Choice>>,
}

const SELF: &str = "self";

impl DecodeWorker {
    /// Starts following the prefill workers in `prefill_workers` and this
    /// engine's own KV events. Call inside a Tokio runtime.
    pub fn start(
        engine: EngineHandle,
        config: DecodeConfig,
        prefill_workers: watch::Receiver<BTreeSet<String>>,
    ) -> Result<Arc<Self>, anyhow::Error> {
        let block_size = engine.block_size();
        let picker = Router::new_prefill_picker(RouterConfig::new(block_size))?;
        let timeout = config.transfer_timeout;
        let prefill = WorkerPool::start(
            PoolConfig::new("prefill"),
            picker,
            prefill_workers,
            move |address, channel| PrefillClient::with_channel(channel, address, timeout),
        );
        let local_cache = Arc::new(Mutex::new(PrefixIndex::new(block_size)?));
        tokio::spawn(follow_own_cache(
            engine.subscribe_kv_events(),
            Arc::downgrade(&local_cache),
        ));
        Ok(Arc::new(Self {
            engine,
            config,
            prefill,
            local_cache,
            node_id: cuda_ipc::node_id(),
            logged_choice: Mutex::new(HashMap::new()),
        }))
    }

    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    pub fn prefill_pool(&self) -> &Arc<WorkerPool<PrefillClient>> {
        &self.prefill
    }

    /// Prompt tokens this worker's prefix cache holds (whole blocks).
    pub fn cached_tokens(&self, prompt: &[u32]) -> usize {
        let index = self.local_cache.lock().expect("cache index lock");
        let hashes = index.prompt_hashes(prompt);
        let blocks = index
            .overlaps(&hashes)
            .get(&WorkerId::from(SELF))
            .copied()
            .unwrap_or(0);
        blocks * index.block_size()
    }

    /// Admits `request`, prefilling it where the policy says.
    pub async fn start_request(
        &self,
        request: GenerateRequest,
    ) -> Result<(GenerateStream, PrefillLocation), InferError> {
        self.engine.check_request(&request)?;
        let uncached = request
            .prompt
            .len()
            .saturating_sub(self.cached_tokens(&request.prompt));
        let m = metrics();
        // Prompt logprobs come from computing the prompt here, position by position.
        let remote_ok = request.sampling.prompt_logprobs.is_none();
        if remote_ok && uncached >= self.config.remote_prefill_min_tokens {
            if let Some(stream) = self.try_remote(&request).await? {
                m.prefills.with_label_values(&[ROLE, "remote"]).inc();
                return Ok((stream, PrefillLocation::Remote));
            }
        }
        let stream = self.engine.generate(request)?;
        m.prefills.with_label_values(&[ROLE, "local"]).inc();
        Ok((stream, PrefillLocation::Local))
    }

    /// `Ok(None)`: no prefill worker had room or every attempt failed;
    /// prefill locally.
    async fn try_remote(
        &self,
        request: &GenerateRequest,
    ) -> Result<Option<GenerateStream>, InferError> {
        let max_queue = self.config.prefill_max_queue as u32;
        let mut tried: Vec<WorkerId> = Vec::new();
        for _ in 0..self.config.prefill_attempts {
            let routed = self
                .prefill
                .route(&request.prompt, &tried, |load| load.queue_depth < max_queue);
            let Ok((route, client)) = routed else {
                return Ok(None);
            };
            let worker = route.worker.clone();
            let remote_request = RemotePrefillRequest {
                request_id: request.id.clone(),
                prompt: request.prompt.clone(),
                sampling: request.sampling.clone(),
            };
            let choice = cuda_ipc::choose(
                self.config.kv_transfer,
                self.engine.kv_pool_export(),
                &self.node_id,
                self.prefill.last_load(&worker).as_ref(),
            );
            // The Prefill RPC's client span: its context goes in the call's
            // metadata, the decode side's `kv_transfer` is its child.
            let call = tandem_telemetry::client_span("tandem.Prefill/Prefill");
            tandem_telemetry::set_attribute(&call, "tandem.prefill_worker", worker.to_string());
            let result = match choice {
                Err(reason) => Err(TransferError::Local(reason)),
                Ok(choice) => {
                    self.log_choice(&worker, &choice);
                    match choice {
                        Choice::CudaIpc => {
                            client
                                .prefill_via_cuda_ipc(&self.engine, remote_request)
                                .instrument(call.clone())
                                .await
                        }
                        Choice::Grpc(_) => client
                            .prefill(remote_request)
                            .instrument(call.clone())
                            .await
                            .map(IpcPrefill::Streamed),
                    }
                }
            };
            if let Err(e) = &result {
                tandem_telemetry::set_error(&call, e.to_string());
            }
            drop(call);
            self.prefill.finish(route.ticket);
            match result {
                Ok(remote) => {
                    metrics()
                        .remote_prefill_tokens
                        .with_label_values(&[ROLE])
                        .inc_by(request.prompt.len() as u64);
                    return match remote {
                        IpcPrefill::Written {
                            reservation,
                            first_token,
                            written,
                        } => {
                            tracing::debug!(
                                request = %request.id,
                                prefill_worker = %worker,
                                bytes = written.bytes,
                                copy_seconds = written.copy_seconds,
                                cached_tokens = written.cached_tokens,
                                "prompt prefilled remotely, KV written over cuda-ipc"
                            );
                            self.engine
                                .generate_with_reserved(request.clone(), reservation, first_token)
                                .map(Some)
                        }
                        IpcPrefill::Streamed(remote) => {
                            if let Some(reason) = &remote.cuda_ipc_declined {
                                self.log_choice(&worker, &Choice::Grpc(Some(reason.clone())));
                            }
                            tracing::debug!(
                                request = %request.id,
                                prefill_worker = %worker,
                                bytes = remote.bytes,
                                cached_tokens = remote.cached_tokens,
                                "prompt prefilled remotely"
                            );
                            self.engine
                                .generate_with_kv(request.clone(), remote.kv, remote.first_token)
                                .map(Some)
                        }
                    };
                }
                Err(e) => {
                    tracing::warn!(
                        request = %request.id,
                        prefill_worker = %worker,
                        "remote prefill failed, trying elsewhere: {e}"
                    );
                    metrics()
                        .remote_prefill_failures
                        .with_label_values(&[ROLE])
                        .inc();
                    tried.push(worker);
                }
            }
        }
        Ok(None)
    }
}

impl DecodeWorker {
    /// Logs how the KV comes back from `worker` when that is new or changed.
    fn log_choice(&self, worker: &WorkerId, choice: &Choice) {
        let mut logged = self.logged_choice.lock().expect("choice log lock");
        if logged.get(worker) == Some(choice) {
            return;
        }
        match choice {
            Choice::CudaIpc => {
                tracing::info!(prefill_worker = %worker, "KV transfer with this prefill worker: cuda-ipc")
            }
            Choice::Grpc(None) => {
                tracing::info!(prefill_worker = %worker, "KV transfer with this prefill worker: grpc")
            }
            Choice::Grpc(Some(reason)) => tracing::info!(
                prefill_worker = %worker,
                "KV transfer with this prefill worker: grpc, not cuda-ipc: {reason}"
            ),
        }
        logged.insert(worker.clone(), choice.clone());
    }
}

async fn follow_own_cache(
    mut events: broadcast::Receiver<tandem_engine::block_manager::KvEvent>,
    index: std::sync::Weak<Mutex<PrefixIndex>>,
) {
    let me = WorkerId::from(SELF);
    loop {
        let event = events.recv().await;
        let Some(index) = index.upgrade() else { return };
        let mut index = index.lock().expect("cache index lock");
        match event {
            Ok(event) => index.apply(&me, &event),
            // Missed events: forget rather than believe stale blocks cached.
            Err(broadcast::error::RecvError::Lagged(_)) => index.clear_worker(&me),
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// The `Decode` gRPC service.
pub struct DecodeService {
    worker: Arc<DecodeWorker>,
}

impl DecodeService {
    pub fn server(worker: Arc<DecodeWorker>) -> pb::decode_server::DecodeServer<Self> {
        pb::decode_server::DecodeServer::new(Self { worker })
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::decode_server::Decode for DecodeService {
    type GenerateStream = ResponseStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        // The frontend's trace context and request id: this worker's span of
        // the request is a child of the frontend's call.
        let parent = tandem_telemetry::propagation::extract_metadata(request.metadata());
        let request_id =
            tandem_telemetry::propagation::request_id_from_metadata(request.metadata())
                .unwrap_or_else(tandem_telemetry::propagation::new_request_id);
        let span = tandem_telemetry::request_span(
            "tandem.Decode/Generate",
            "server",
            &request_id,
            Some(parent),
        );
        let request = request_from_pb(request.into_inner())?;
        // Refuse what the engine would refuse before any prefill work.
        self.worker
            .engine
            .check_request(&request)
            .map_err(|e| status_of(&e))?;
        let (tx, rx) = mpsc::channel(64);
        let worker = self.worker.clone();
        tokio::spawn(
            async move {
                let prompt_tokens = request.prompt.len();
                let mut phases = tandem_telemetry::phases::Phases::start(false);
                // The caller hanging up drops `rx`: stop whatever is under way
                // (dropping the prefill future or the stream cancels it).
                let started = tokio::select! {
                    started = worker.start_request(request) => started,
                    () = tx.closed() => return,
                };
                let (mut stream, location) = match started {
                    Ok(started) => started,
                    Err(e) => {
                        tracing::info!(prompt_tokens, "request refused: {e}");
                        let _ = tx.send(Err(status_of(&e))).await;
                        return;
                    }
                };
                if location == PrefillLocation::Remote {
                    phases = phases.map(|p| p.prefilled_elsewhere());
                }
                let mut tokens = 0usize;
                let outcome = loop {
                    tokio::select! {
                        event = stream.next_event() => {
                            let Some(event) = event else { break "engine stopped" };
                            let outcome = match &event {
                                GenerateEvent::Started { .. } => {
                                    if let Some(p) = &mut phases { p.admitted() }
                                    None
                                }
                                GenerateEvent::Token(_) => {
                                    tokens += 1;
                                    if let Some(p) = &mut phases { p.token() }
                                    None
                                }
                                GenerateEvent::PromptLogprobs(_) => None,
                                GenerateEvent::Finished(reason) => Some(match reason {
                                    FinishReason::Stop => "stop",
                                    FinishReason::Length => "length",
                                    FinishReason::Cancelled => "cancelled",
                                }),
                                GenerateEvent::Error(_) => Some("error"),
                            };
                            if tx.send(Ok(event_to_pb(&event))).await.is_err() {
                                break "caller gone";
                            }
                            if let Some(outcome) = outcome {
                                break outcome;
                            }
                        }
                        () = tx.closed() => break "caller gone",
                    }
                };
                if let Some(p) = &mut phases {
                    p.finish(outcome);
                }
                tracing::info!(
                    prompt_tokens,
                    completion_tokens = tokens,
                    prefill = location.as_str(),
                    outcome,
                    "request finished"
                );
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
