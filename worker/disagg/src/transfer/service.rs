//! The prefill side of the `Prefill` RPC: [`PrefillService`] answers a decode
//! worker's request from a [`PrefillSource`] (the prefill worker's engine, or
//! a benchmark's synthetic KV). Streamed, the prompt's KV goes back in wire
//! chunks as the prefill computes each layer of each prefill chunk, then the
//! first token; with a cuda-ipc target in the request, the source writes the
//! KV into the decode worker's pool ([`cuda_ipc`]) and the answer is
//! `KvWritten`, then the first token. Either way it counts
//! `tandem_kv_transfer_bytes_total` and `tandem_kv_transfer_seconds`.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use super::channel::MAX_MESSAGE_BYTES;
use super::cuda_ipc;
use super::rpc::{
    sampling_from_pb, status_of, token_to_pb, transfer_bytes, transfer_seconds, PrefillPart,
    PrefillParts, RemotePrefillRequest, TransferError, CUDA_IPC, GRPC,
};
use super::wire::{self, KvSplitter};
use tandem_api::infer::InferError;
use tandem_api::pb::{self, prefill_response::Part};
use tandem_api::types::{PrefillEvent, SamplingParams};
use tandem_engine::EngineHandle;
use tandem_telemetry::{phases, propagation, KeyValue};

/// `role` label of the transfer metrics on this side.
const ROLE: &str = "prefill";

/// Chunks buffered per request before the service waits for the receiver
/// (backpressure instead of unbounded memory).
const SEND_BUFFER_CHUNKS: usize = 8;

/// Produces a prompt's prefill parts; the prefill worker's engine is one, a
/// benchmark's synthetic KV another.
pub trait PrefillSource: Send + Sync + 'static {
    /// The parts of a prefill whose KV is streamed: the layout, the KV, then
    /// the first token.
    fn prefill_parts(&self, request: RemotePrefillRequest) -> PrefillParts;

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

impl PrefillSource for EngineHandle {
    fn prefill_parts(&self, request: RemotePrefillRequest) -> PrefillParts {
        engine_prefill_parts(self.clone(), request.prompt, request.sampling).boxed()
    }

    fn prefill_to_peer(
        &self,
        request: RemotePrefillRequest,
        target: pb::CudaIpcTarget,
    ) -> BoxFuture<'static, Result<PrefillParts, String>> {
        Box::pin(cuda_ipc::engine_prefill_to_peer(
            self.clone(),
            request,
            target,
        ))
    }
}

/// Prefills `prompt` on `engine` and yields its parts to stream.
///
/// Parts follow the engine's prefill stream: each layer's K and V leave as
/// soon as that layer of that prefill chunk is computed, so the transfer
/// overlaps with the layers and chunks still computing; the first token comes
/// last.
pub fn engine_prefill_parts(
    engine: EngineHandle,
    prompt: Vec<u32>,
    sampling: SamplingParams,
) -> impl Stream<Item = Result<PrefillPart, InferError>> + Send {
    let (num_layers, kv_heads, head_dim) = engine.kv_shape();
    // The pool's own dtype: a bf16 pool's values are exactly representable.
    let dtype = engine.kv_dtype();
    let started = engine.prefill_stream(prompt, sampling);
    futures::stream::unfold(Some(started), move |state| async move {
        let mut stream = match state? {
            Ok(stream) => stream,
            Err(e) => return Some((Err(e), None)),
        };
        let part = match stream.next_event().await {
            None => Err(InferError::Unavailable(
                "the engine stopped during prefill".into(),
            )),
            Some(PrefillEvent::Started {
                prompt_tokens,
                cached_tokens,
            }) => {
                let mut layout = pb::KvLayout {
                    dtype: 0,
                    num_layers: num_layers as u32,
                    num_tokens: prompt_tokens as u32,
                    kv_heads: kv_heads as u32,
                    head_dim: head_dim as u32,
                    cached_tokens: cached_tokens as u32,
                    cuda_ipc_declined: String::new(),
                };
                layout.set_dtype(wire::wire_dtype(dtype));
                Ok(PrefillPart::Layout(layout))
            }
            // Already bytes of the pool's dtype: on the wire as they are.
            Some(PrefillEvent::Kv(chunk)) => Ok(PrefillPart::Kv {
                layer: chunk.layer as u32,
                start_pos: chunk.start_pos as u32,
                k: chunk.k,
                v: chunk.v,
            }),
            Some(PrefillEvent::Done(token)) => {
                return Some((Ok(PrefillPart::FirstToken(token)), None))
            }
            Some(PrefillEvent::Error(e)) => return Some((Err(InferError::Unavailable(e)), None)),
            Some(PrefillEvent::PeerWritten(_)) => Err(InferError::Unavailable(
                "a streamed prefill reported a write into a peer's pool".into(),
            )),
        };
        let next = part.is_ok().then_some(Ok(stream));
        Some((part, next))
    })
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
    /// with the KV streamed and that reason.
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

#[tonic::async_trait]
impl<S: PrefillSource> pb::prefill_server::Prefill for PrefillService<S> {
    type PrefillStream = ReceiverStream<Result<pb::PrefillResponse, Status>>;

    async fn prefill(
        &self,
        request: Request<pb::PrefillRequest>,
    ) -> Result<Response<Self::PrefillStream>, Status> {
        let arrived = tandem_telemetry::enabled().then(SystemTime::now);
        // The decode worker's trace context and request id: this worker's
        // span of the request is a child of its Prefill call.
        let parent = propagation::extract_metadata(request.metadata());
        let request_id = propagation::request_id_from_metadata(request.metadata())
            .unwrap_or_else(propagation::new_request_id);
        let span = tandem_telemetry::request_span(
            "tandem.Prefill/Prefill",
            "server",
            &request_id,
            Some(parent),
        );
        let req = request.into_inner();
        let prompt_tokens = req.prompt.len();
        let request = RemotePrefillRequest {
            request_id: req.request_id,
            prompt: req.prompt,
            sampling: req
                .sampling
                .map(sampling_from_pb)
                .transpose()?
                .unwrap_or_default(),
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
        let clock = PrefillClock {
            arrived,
            prompt_tokens,
            ..PrefillClock::default()
        };
        tokio::spawn(send_parts(parts, declined, tx, clock).instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Turns parts into messages until the source ends, fails, or the receiver
/// goes away (then the rest is dropped, which cancels nothing already done).
async fn send_parts(
    mut parts: PrefillParts,
    cuda_ipc_declined: Option<String>,
    tx: mpsc::Sender<Result<pb::PrefillResponse, Status>>,
    mut clock: PrefillClock,
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
                clock.admitted(l.cached_tokens as usize);
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
                clock.kv_sent();
                for chunk in chunks {
                    let n = chunk.k.len() + chunk.v.len();
                    if tx.send(msg(Part::Chunk(chunk))).await.is_err() {
                        return;
                    }
                    bytes += n;
                    transfer_bytes(ROLE, "sent", GRPC).inc_by(n as u64);
                }
            }
            PrefillPart::KvWritten(written) => {
                clock.written(written.bytes, written.copy_seconds);
                transfer_bytes(ROLE, "sent", CUDA_IPC).inc_by(written.bytes);
                transfer_seconds(ROLE, "sent", CUDA_IPC).observe(written.copy_seconds);
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
                    transfer_seconds(ROLE, "sent", GRPC).observe(t.elapsed().as_secs_f64());
                }
                clock.finish(bytes as u64);
                tracing::info!(
                    prompt_tokens = clock.prompt_tokens,
                    cached_tokens = clock.cached_tokens,
                    bytes = clock.bytes,
                    transport = if clock.written_at.is_some() {
                        CUDA_IPC
                    } else {
                        GRPC
                    },
                    "prefill finished, KV sent"
                );
                return;
            }
        }
    }
}

/// Phase boundaries of one prefill on this side, read when tracing is on:
/// arrival → layout (`queue`), layout → first token (`prefill`), first KV
/// chunk sent → first token (`kv_transfer`; the KV leaves layer by layer while
/// later layers compute, so it overlaps `prefill`).
#[derive(Default)]
struct PrefillClock {
    /// `None`: tracing is off, nothing is read.
    arrived: Option<SystemTime>,
    admitted_at: Option<SystemTime>,
    first_kv_at: Option<SystemTime>,
    /// cuda-ipc: when the copy into the decode worker's pool ended, and its
    /// GPU time.
    written_at: Option<(SystemTime, f64)>,
    prompt_tokens: usize,
    cached_tokens: usize,
    bytes: u64,
}

impl PrefillClock {
    fn admitted(&mut self, cached_tokens: usize) {
        self.cached_tokens = cached_tokens;
        if self.arrived.is_some() {
            self.admitted_at.get_or_insert_with(SystemTime::now);
        }
    }

    fn kv_sent(&mut self) {
        if self.arrived.is_some() {
            self.first_kv_at.get_or_insert_with(SystemTime::now);
        }
    }

    fn written(&mut self, bytes: u64, copy_seconds: f64) {
        self.bytes = bytes;
        if self.arrived.is_some() {
            self.written_at = Some((SystemTime::now(), copy_seconds));
        }
    }

    /// The first token is out: records the spans under the current one.
    fn finish(&mut self, streamed_bytes: u64) {
        if self.written_at.is_none() {
            self.bytes = streamed_bytes;
        }
        let Some(arrived) = self.arrived else { return };
        let now = SystemTime::now();
        let parent = tandem_telemetry::current_context();
        let tokens = vec![
            KeyValue::new("tandem.prompt_tokens", self.prompt_tokens as i64),
            KeyValue::new("tandem.cached_tokens", self.cached_tokens as i64),
        ];
        // cuda-ipc answers carry no layout: admission is not seen, and
        // `prefill` then starts at arrival.
        let prefill_start = match self.admitted_at {
            Some(admitted) => {
                phases::record(&parent, "queue", arrived, admitted, Vec::new());
                admitted
            }
            None => arrived,
        };
        phases::record(&parent, "prefill", prefill_start, now, tokens);
        let (start, end, transport) = match (self.written_at, self.first_kv_at) {
            (Some((at, seconds)), _) => (phases::before(at, seconds), at, CUDA_IPC),
            (None, Some(first)) => (first, now, GRPC),
            (None, None) => return,
        };
        phases::record(
            &parent,
            "kv_transfer",
            start,
            end,
            vec![
                KeyValue::new("tandem.kv.direction", "sent"),
                KeyValue::new("tandem.kv.transport", transport),
                KeyValue::new("tandem.kv.bytes", self.bytes as i64),
            ],
        );
    }
}
