//! KV transfer between prefill and decode workers (DESIGN.md "KV transfer").
//!
//! [`wire`] is the layout-independent format every transport carries;
//! [`Transport`] is what a decode worker calls to get a prompt prefilled
//! elsewhere; [`grpc`] is the default transport (server on the prefill side,
//! client on the decode side). `cuda-ipc` and `rdma` implement the same trait.

pub mod grpc;
pub mod wire;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::Stream;

use crate::engine::types::{KvExport, SamplingParams, TokenOutput};
use crate::engine::EngineHandle;
use crate::infer::InferError;

/// Code generated from `proto/tandem.proto`.
pub mod pb {
    tonic::include_proto!("tandem.v1");
}

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
    pub kv: KvExport,
    pub first_token: TokenOutput,
    /// Prompt tokens the prefill worker took from its prefix cache.
    pub cached_tokens: usize,
    /// K and V bytes received.
    pub bytes: usize,
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
/// each layer's K and V (`[num_tokens, kv_heads, head_dim]`, little-endian
/// bytes of the layout's dtype) in layer order, then the first token.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefillPart {
    Layout(pb::KvLayout),
    Layer { index: u32, k: Bytes, v: Bytes },
    FirstToken(TokenOutput),
}

/// Prefills `prompt` on `engine` and yields its parts for a transport to send.
///
/// The engine hands over the KV once the whole prompt is computed
/// (`EngineHandle::prefill_only`); layers are then yielded one by one, so the
/// transport already sends per layer and will overlap with compute unchanged
/// once the engine streams layers as they finish.
pub fn engine_prefill_parts(
    engine: EngineHandle,
    prompt: Vec<u32>,
    sampling: SamplingParams,
) -> impl Stream<Item = Result<PrefillPart, InferError>> + Send {
    use futures::StreamExt;
    futures::stream::once(async move { engine.prefill_only(prompt, sampling).await }).flat_map(
        |result| {
            let parts: Vec<Result<PrefillPart, InferError>> = match result {
                Err(e) => vec![Err(e)],
                Ok(out) => {
                    let layout = pb::KvLayout::of_export(&out.kv, out.cached_tokens);
                    let mut parts = Vec::with_capacity(out.kv.num_layers() + 2);
                    parts.push(Ok(PrefillPart::Layout(layout)));
                    for (i, (k, v)) in out.kv.layers.into_iter().enumerate() {
                        parts.push(Ok(PrefillPart::Layer {
                            index: i as u32,
                            k: wire::f32_bytes(k),
                            v: wire::f32_bytes(v),
                        }));
                    }
                    parts.push(Ok(PrefillPart::FirstToken(out.first_token)));
                    parts
                }
            };
            futures::stream::iter(parts)
        },
    )
}
