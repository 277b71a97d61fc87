//! The gRPC KV transport: `Prefill.Prefill` served on the prefill worker
//! ([`PrefillService`]) and called by the decode worker ([`GrpcTransport`]).
//! The prompt's KV streams back in wire chunks as the prefill computes each
//! layer of each prefill chunk, then the first token; both sides count `tandem_kv_transfer_bytes_total` and
//! `tandem_kv_transfer_seconds`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::pb::{self, prefill_client::PrefillClient, prefill_response::Part};
use super::wire::{self, KvAssembler, KvSplitter};
use super::{
    engine_prefill_parts, PrefillPart, RemotePrefill, RemotePrefillRequest, TransferError,
    Transport,
};
use tandem_api::infer::InferError;
use tandem_api::metrics::metrics;
use tandem_api::types::{SamplingParams, TokenOutput};
use tandem_engine::EngineHandle;

/// Role labels of the transfer metrics on each side.
const SENDER_ROLE: &str = "prefill";
const RECEIVER_ROLE: &str = "decode";
/// `transport` labels of the transfer metrics.
pub const GRPC: &str = "grpc";
pub const CUDA_IPC: &str = "cuda-ipc";

/// HTTP/2 windows big enough that a 4 MiB chunk is not throttled by flow
/// control on fast links (the 64 KiB default caps throughput per round trip).
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame each side accepts: a 4 MiB chunk crosses in four
/// frames instead of 256 of the protocol's default 16 KiB, each of which
/// costs a header, a flow-control update and a trip through both stacks.
const MAX_FRAME: u32 = 1 << 20;
/// Chunk messages plus room for their other fields.
const MAX_MESSAGE_BYTES: usize = wire::MAX_CHUNK_BYTES + (64 << 10);
/// Chunks buffered per request on the sending side before it waits for the
/// receiver (backpressure instead of unbounded memory).
const SEND_BUFFER_CHUNKS: usize = 8;

/// Produces a prompt's prefill parts; the prefill worker's engine is one, a
/// benchmark's synthetic KV another.
pub trait PrefillSource: Send + Sync + 'static {
    fn prefill_parts(
        &self,
        request: RemotePrefillRequest,
    ) -> BoxStream<'static, Result<PrefillPart, InferError>>;

    /// The parts of a prefill whose KV goes straight into the requesting
    /// decode worker's pool (cuda-ipc): `KvWritten`, then the first token.
    /// `Err` says why this source cannot; the KV is then streamed.
    fn prefill_to_peer(
        &self,
        _request: RemotePrefillRequest,
        _target: pb::CudaIpcTarget,
    ) -> BoxFuture<'static, Result<PrefillParts, String>> {
        Box::pin(futures::future::ready(Err(
            "this prefill worker cannot write KV over CUDA IPC".to_string(),
        )))
    }
}

pub type PrefillParts = BoxStream<'static, Result<PrefillPart, InferError>>;

impl PrefillSource for EngineHandle {
    fn prefill_parts(
        &self,
        request: RemotePrefillRequest,
    ) -> BoxStream<'static, Result<PrefillPart, InferError>> {
        engine_prefill_parts(self.clone(), request.prompt, request.sampling).boxed()
    }

    fn prefill_to_peer(
        &self,
        request: RemotePrefillRequest,
        target: pb::CudaIpcTarget,
    ) -> BoxFuture<'static, Result<PrefillParts, String>> {
        Box::pin(super::cuda_ipc::engine_prefill_to_peer(
            self.clone(),
            request,
            target,
        ))
    }
}

/// The `Prefill` gRPC service over a [`PrefillSource`].
pub struct PrefillService<S> {
    source: Arc<S>,
    /// Why requests for cuda-ipc are declined regardless of the source
    /// (`--kv-transfer grpc`); `None` lets the source try.
    cuda_ipc_off: Option<String>,
}

impl<S: PrefillSource> PrefillService<S> {
    /// The service, ready to add to a `tonic::transport::Server`.
    pub fn server(source: S) -> pb::prefill_server::PrefillServer<Self> {
        Self::server_with(source, None)
    }

    /// The service; with `cuda_ipc_off`, every cuda-ipc request is answered
    /// over gRPC with that reason.
    pub fn server_with(
        source: S,
        cuda_ipc_off: Option<String>,
    ) -> pb::prefill_server::PrefillServer<Self> {
        pb::prefill_server::PrefillServer::new(Self {
            source: Arc::new(source),
            cuda_ipc_off,
        })
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// A `tonic` server builder with the transfer's flow-control windows and
/// frame size.
pub fn server_builder() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
}

#[tonic::async_trait]
impl<S: PrefillSource> pb::prefill_server::Prefill for PrefillService<S> {
    type PrefillStream = ReceiverStream<Result<pb::PrefillResponse, Status>>;

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<Self::PrefillStream>, Status> {
        let req = request.into_inner();
        let request = RemotePrefillRequest {
            request_id: req.request_id,
            prompt: req.prompt,
            sampling: req.sampling.map(sampling_from_pb).unwrap_or_default(),
        };
        let mut declined = None;
        let parts = match (req.cuda_ipc, &self.cuda_ipc_off) {
            (None, _) => self.source.prefill_parts(request),
            (Some(_), Some(off)) => {
                declined = Some(off.clone());
                self.source.prefill_parts(request)
            }
            (Some(target), None) => {
                let device = target.device.clone();
                match self.source.prefill_to_peer(request.clone(), target).await {
                    Ok(parts) => parts,
                    Err(reason) => {
                        tracing::warn!(
                            request = %request.request_id,
                            decode_gpu = %device,
                            "cuda-ipc declined, streaming the KV over gRPC: {reason}"
                        );
                        declined = Some(reason);
                        self.source.prefill_parts(request)
                    }
                }
            }
        };
        let (tx, rx) = mpsc::channel(SEND_BUFFER_CHUNKS);
        tokio::spawn(send_parts(parts, declined, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Turns parts into messages until the source ends, fails, or the receiver
/// goes away (then the rest is dropped, which cancels nothing already done).
async fn send_parts(
    mut parts: BoxStream<'static, Result<PrefillPart, InferError>>,
    cuda_ipc_declined: Option<String>,
    tx: mpsc::Sender<Result<pb::PrefillResponse, Status>>,
) {
    let msg = |part: Part| Ok(pb::PrefillResponse { part: Some(part) });
    let mut splitter: Option<KvSplitter> = None;
    let mut started: Option<Instant> = None;
    let mut bytes = 0usize;
    loop {
        // A caller that hung up cancels the prefill now (dropping `parts`
        // cancels it in the engine), not when the next part is ready: a
        // cuda-ipc prefill must not write into blocks its caller freed.
        let part = tokio::select! {
            part = parts.next() => part,
            () = tx.closed() => return,
        };
        let Some(part) = part else { return };
        let part = match part {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(status_of(&e))).await;
                return;
            }
        };
        match part {
            PrefillPart::Layout(mut l) => {
                started = Some(Instant::now());
                if let Some(reason) = &cuda_ipc_declined {
                    l.cuda_ipc_declined = reason.clone();
                }
                splitter = match KvSplitter::new(l.clone()) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                if tx.send(msg(Part::Layout(l))).await.is_err() {
                    return;
                }
            }
            PrefillPart::Kv {
                layer,
                start_pos,
                k,
                v,
            } => {
                let chunks = splitter
                    .as_mut()
                    .ok_or_else(|| TransferError::Protocol("KV before the layout".into()))
                    .and_then(|s| s.chunks(layer, start_pos, &k, &v));
                let chunks = match chunks {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                for chunk in chunks {
                    let n = chunk.k.len() + chunk.v.len();
                    if tx.send(msg(Part::Chunk(chunk))).await.is_err() {
                        return;
                    }
                    bytes += n;
                    metrics()
                        .kv_transfer_bytes
                        .with_label_values(&[SENDER_ROLE, "sent", GRPC])
                        .inc_by(n as u64);
                }
            }
            PrefillPart::KvWritten(written) => {
                metrics()
                    .kv_transfer_bytes
                    .with_label_values(&[SENDER_ROLE, "sent", CUDA_IPC])
                    .inc_by(written.bytes);
                metrics()
                    .kv_transfer_seconds
                    .with_label_values(&[SENDER_ROLE, "sent", CUDA_IPC])
                    .observe(written.copy_seconds);
                if tx.send(msg(Part::KvWritten(written))).await.is_err() {
                    return;
                }
            }
            PrefillPart::FirstToken(token) => {
                if tx
                    .send(msg(Part::FirstToken(token_to_pb(&token))))
                    .await
                    .is_err()
                {
                    return;
                }
                if let Some(t) = started {
                    metrics()
                        .kv_transfer_seconds
                        .with_label_values(&[SENDER_ROLE, "sent", GRPC])
                        .observe(t.elapsed().as_secs_f64());
                }
                tracing::debug!(bytes, "KV sent");
                return;
            }
        }
    }
}

pub fn status_of(e: &InferError) -> Status {
    match e {
        InferError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
        InferError::Invalid(_) => Status::invalid_argument(e.to_string()),
        InferError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}

/// A bound listener as the incoming connections of a tonic server, with
/// `TCP_NODELAY` on each: small messages (a first token, a cuda-ipc
/// `KvWritten`) leave at once instead of waiting out the peer's delayed ACK
/// (about 40 ms on Linux; `serve_with_incoming` does not apply the builder's
/// own `tcp_nodelay`).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A tonic endpoint for a worker at `addr` (`http://host:port`) with the
/// transfer's flow-control windows and frame size, `TCP_NODELAY`, and HTTP/2 keep-alives so
/// a peer that vanished without closing its socket is noticed.
pub fn endpoint(addr: &str, connect_timeout: Duration) -> Result<Endpoint, TransferError> {
    Ok(Endpoint::from_shared(addr.to_string())
        .map_err(|e| TransferError::Connection {
            peer: addr.to_string(),
            reason: format!("bad address: {e}"),
        })?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_timeout(connect_timeout))
}

/// The decode side: asks one prefill worker over gRPC.
#[derive(Clone)]
pub struct GrpcTransport {
    client: PrefillClient<Channel>,
    peer: String,
    message_timeout: Duration,
}

impl GrpcTransport {
    /// A client for the prefill worker at `addr` (`http://host:port`); it
    /// connects on first use. A transfer fails with [`TransferError::Timeout`]
    /// when no message arrives for `message_timeout`. Call it inside a Tokio
    /// runtime (the channel spawns its connection task there).
    pub fn new(addr: &str, message_timeout: Duration) -> Result<Self, TransferError> {
        let channel = endpoint(addr, message_timeout)?.connect_lazy();
        Ok(Self::with_channel(channel, addr, message_timeout))
    }

    /// A client on an existing channel (e.g. one a worker pool also uses for
    /// the peer's `Worker` service).
    pub fn with_channel(channel: Channel, peer: &str, message_timeout: Duration) -> Self {
        Self {
            client: PrefillClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            peer: peer.to_string(),
            message_timeout,
        }
    }

    fn status_error(&self, status: Status) -> TransferError {
        let reason = status.message().to_string();
        // tonic often repeats the cause in the message; say it once.
        let reason = match std::error::Error::source(&status).map(|c| c.to_string()) {
            Some(cause) if reason.is_empty() => cause,
            Some(cause) if !reason.contains(&cause) => format!("{reason}: {cause}"),
            _ => reason,
        };
        let peer = self.peer.clone();
        match status.code() {
            Code::InvalidArgument | Code::ResourceExhausted | Code::FailedPrecondition => {
                TransferError::Remote { peer, reason }
            }
            _ => TransferError::Connection { peer, reason },
        }
    }

    async fn next<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, TransferError> {
        match tokio::time::timeout(self.message_timeout, fut).await {
            Err(_) => Err(TransferError::Timeout {
                peer: self.peer.clone(),
                seconds: self.message_timeout.as_secs_f64(),
            }),
            Ok(r) => r.map_err(|s| self.status_error(s)),
        }
    }

    async fn fetch(&self, request: RemotePrefillRequest) -> Result<RemotePrefill, TransferError> {
        match self.fetch_with(request, None).await? {
            Fetched::Streamed(remote) => Ok(remote),
            Fetched::Written { .. } => Err(TransferError::Protocol(
                "KV written into this worker's pool, which was not offered".into(),
            )),
        }
    }

    /// The prefill worker's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Asks for a prefill; with `cuda_ipc`, offers the prefill worker these
    /// blocks of this worker's pool to write the KV into. The answer is the
    /// KV streamed (always without `cuda_ipc`, or when the prefill worker
    /// declined: the reason is in the layout) or the news that it was written.
    pub async fn fetch_with(
        &self,
        request: RemotePrefillRequest,
        cuda_ipc: Option<pb::CudaIpcTarget>,
    ) -> Result<Fetched, TransferError> {
        let started = Instant::now();
        let offered_ipc = cuda_ipc.is_some();
        let req = pb::PrefillRequest {
            request_id: request.request_id,
            prompt: request.prompt,
            sampling: Some(sampling_to_pb(&request.sampling)),
            cuda_ipc,
        };
        let mut client = self.client.clone();
        let mut stream = self.next(client.prefill(req)).await?.into_inner();
        let mut assembler: Option<KvAssembler> = None;
        let mut written: Option<pb::KvWritten> = None;
        let mut declined: Option<String> = None;
        let received =
            metrics()
                .kv_transfer_bytes
                .with_label_values(&[RECEIVER_ROLE, "received", GRPC]);
        loop {
            let Some(message) = self.next(stream.message()).await? else {
                let state = match &assembler {
                    None => "before the KV layout".to_string(),
                    Some(a) => format!("after {}, before the first token", a.progress()),
                };
                return Err(TransferError::Incomplete(format!(
                    "{} closed the stream {state}",
                    self.peer
                )));
            };
            match message.part {
                Some(Part::KvWritten(w))
                    if offered_ipc && assembler.is_none() && written.is_none() =>
                {
                    written = Some(w);
                }
                Some(Part::KvWritten(_)) => {
                    return Err(TransferError::Protocol(
                        "a KV-written message where none was expected".into(),
                    ))
                }
                Some(Part::FirstToken(token)) if written.is_some() => {
                    let written = written.expect("checked");
                    metrics()
                        .kv_transfer_bytes
                        .with_label_values(&[RECEIVER_ROLE, "received", CUDA_IPC])
                        .inc_by(written.bytes);
                    metrics()
                        .kv_transfer_seconds
                        .with_label_values(&[RECEIVER_ROLE, "received", CUDA_IPC])
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Fetched::Written {
                        written,
                        first_token: token_from_pb(token),
                    });
                }
                Some(Part::Layout(layout)) if assembler.is_none() && written.is_none() => {
                    declined = (!layout.cuda_ipc_declined.is_empty())
                        .then(|| layout.cuda_ipc_declined.clone());
                    assembler = Some(KvAssembler::new(layout)?);
                }
                Some(Part::Chunk(chunk)) => {
                    let a = assembler.as_mut().ok_or_else(|| {
                        TransferError::Protocol("a KV chunk before the layout".into())
                    })?;
                    let n = chunk.k.len() + chunk.v.len();
                    a.push(chunk)?;
                    received.inc_by(n as u64);
                }
                Some(Part::FirstToken(token)) => {
                    let a = assembler.ok_or_else(|| {
                        TransferError::Protocol("the first token before the KV layout".into())
                    })?;
                    let cached_tokens = a.layout().cached_tokens as usize;
                    let bytes = a.received_bytes();
                    let kv = a.into_pieces()?;
                    metrics()
                        .kv_transfer_seconds
                        .with_label_values(&[RECEIVER_ROLE, "received", GRPC])
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(Fetched::Streamed(RemotePrefill {
                        kv,
                        first_token: token_from_pb(token),
                        cached_tokens,
                        bytes,
                        cuda_ipc_declined: declined,
                    }));
                }
                Some(Part::Layout(_)) => {
                    return Err(TransferError::Protocol("a second KV layout".into()))
                }
                None => return Err(TransferError::Protocol("an empty message".into())),
            }
        }
    }
}

/// What a prefill worker answered.
#[derive(Debug)]
pub enum Fetched {
    /// The KV came over the stream.
    Streamed(RemotePrefill),
    /// The KV went into the offered blocks (cuda-ipc); every write finished.
    Written {
        written: pb::KvWritten,
        first_token: TokenOutput,
    },
}

impl Transport for GrpcTransport {
    fn prefill(
        &self,
        request: RemotePrefillRequest,
    ) -> futures::future::BoxFuture<'_, Result<RemotePrefill, TransferError>> {
        Box::pin(self.fetch(request))
    }
}

pub fn sampling_to_pb(s: &SamplingParams) -> pb::SamplingParams {
    pb::SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.map(|k| k as u32),
        top_p: s.top_p,
        seed: s.seed,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        logprobs: s.logprobs.map(|n| n as u32),
    }
}

pub fn sampling_from_pb(s: pb::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.map(|k| k as usize),
        top_p: s.top_p,
        seed: s.seed,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        logprobs: s.logprobs.map(|n| n as usize),
    }
}

pub fn token_to_pb(t: &TokenOutput) -> pb::Token {
    pb::Token {
        id: t.id,
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .iter()
            .map(|&(id, logprob)| pb::TopLogprob { id, logprob })
            .collect(),
    }
}

pub fn token_from_pb(t: pb::Token) -> TokenOutput {
    TokenOutput {
        id: t.id,
        logprob: t.logprob,
        top_logprobs: t
            .top_logprobs
            .into_iter()
            .map(|p| (p.id, p.logprob))
            .collect(),
    }
}
