//! KV transfer between prefill and decode workers (docs/architecture.md, "KV transfer").
//!
//! [`wire`] is the layout-independent format every transport carries;
//! [`Transport`] is what a decode worker calls to get a prompt prefilled
//! elsewhere; [`grpc`] is the default transport (server on the prefill side,
//! client on the decode side). `cuda-ipc` and `rdma` implement the same trait.

pub mod cuda_ipc;
pub mod grpc;
pub mod wire;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;

use tandem_api::infer::InferError;
use tandem_api::types::{KvPieces, PrefillEvent, SamplingParams, TokenOutput};
use tandem_engine::EngineHandle;

/// Code generated from `proto/tandem.proto`.
pub use tandem_api::pb;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The peer could not be reached or the connection broke.
    #[error("KV transfer connection to {peer} failed: {reason}")]
    Connection { peer: String, reason: String },
    /// The peer answered with an error (e.g. its engine refused the prompt).
    #[error("prefill worker {peer} refused the request: {reason}")]
    Remote { peer: String, reason: String },
    /// Nothing arrived for too long.
    #[error("KV transfer from {peer} stalled: no message for {seconds:.1} s")]
    Timeout { peer: String, seconds: f64 },
    /// The stream ended before all KV and the first token arrived.
    #[error("KV transfer ended early: {0}")]
    Incomplete(String),
    /// This side could not take part (e.g. no KV blocks free to receive into).
    #[error("KV transfer could not start here: {0}")]
    Local(String),
    /// The peer sent something the wire format does not allow.
    #[error("bad KV transfer message: {0}")]
    Protocol(String),
}

/// What a decode worker asks a prefill worker for.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePrefillRequest {
    /// For logs on both sides.
    pub request_id: String,
    pub prompt: Vec<u32>,
    /// How the first token is sampled.
    pub sampling: SamplingParams,
}

/// A prompt prefilled elsewhere, ready for `EngineHandle::generate_with_kv`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemotePrefill {
    /// The KV as it arrived: the wire's bytes, installed as they are.
    pub kv: KvPieces,
    pub first_token: TokenOutput,
    /// Prompt tokens the prefill worker took from its prefix cache.
    pub cached_tokens: usize,
    /// K and V bytes received.
    pub bytes: usize,
    /// Why the prefill worker streamed the KV although cuda-ipc was offered.
    pub cuda_ipc_declined: Option<String>,
}

/// Gets a prompt's KV and first token from a prefill worker. One
/// implementation per transport; a decode worker holds them as trait objects.
pub trait Transport: Send + Sync + 'static {
    fn prefill(
        &self,
        request: RemotePrefillRequest,
    ) -> BoxFuture<'_, Result<RemotePrefill, TransferError>>;
}

/// One step of a prefill as the sending side produces it: the layout, then
/// K and V of (layer, position range) pieces (`[tokens, kv_heads, head_dim]`,
/// little-endian bytes of the layout's dtype) in any order, together covering
/// every position of every layer, then the first token.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefillPart {
    Layout(pb::KvLayout),
    Kv {
        layer: u32,
        start_pos: u32,
        k: Bytes,
        v: Bytes,
    },
    /// Sent instead of `Kv` parts when the KV went straight into the
    /// decode worker's pool (cuda-ipc); the copy has finished.
    KvWritten(pb::KvWritten),
    FirstToken(TokenOutput),
}

/// Prefills `prompt` on `engine` and yields its parts for a transport to send.
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
