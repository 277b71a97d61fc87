//! The `Prefill` RPC in the terms both of its sides share: what a decode
//! worker asks for ([`RemotePrefillRequest`]), what it gets back
//! ([`RemotePrefill`]), the parts a prefill produces on the other side
//! ([`PrefillPart`]), what can go wrong ([`TransferError`]), the conversions
//! to and from the protobuf messages, and the labels of the transfer metrics.

use bytes::Bytes;
use futures::stream::BoxStream;
use prometheus::{Histogram, IntCounter};
use tonic::Status;

use tandem_api::infer::InferError;
use tandem_api::metrics::metrics;
use tandem_api::pb;
use tandem_api::types::{Grammar, KvPieces, SamplingParams, TokenOutput};

/// `transport` label of the transfer metrics for KV streamed in the answer.
pub const GRPC: &str = "grpc";
/// `transport` label of the transfer metrics for KV written into the decode
/// worker's pool (cuda-ipc).
pub const CUDA_IPC: &str = "cuda-ipc";

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

/// A prompt prefilled elsewhere with its KV streamed back, ready for
/// `EngineHandle::generate_with_kv`.
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

/// One step of a prefill as the prefill side produces it. Streamed: the
/// layout, then K and V of (layer, position range) pieces (`[tokens,
/// kv_heads, head_dim]`, little-endian bytes of the layout's dtype) in any
/// order, together covering every position of every layer, then the first
/// token. Written into the decode worker's pool (cuda-ipc): `KvWritten`, then
/// the first token.
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

/// The parts of one prefill, as the prefill side produces them.
pub type PrefillParts = BoxStream<'static, Result<PrefillPart, InferError>>;

/// `tandem_kv_transfer_bytes_total` of one side (`role`, `direction`) and
/// one way the KV moved (`transport`: [`GRPC`] or [`CUDA_IPC`]).
pub(crate) fn transfer_bytes(role: &str, direction: &str, transport: &str) -> IntCounter {
    metrics()
        .kv_transfer_bytes
        .with_label_values(&[role, direction, transport])
}

/// `tandem_kv_transfer_seconds` of one side and one way the KV moved.
pub(crate) fn transfer_seconds(role: &str, direction: &str, transport: &str) -> Histogram {
    metrics()
        .kv_transfer_seconds
        .with_label_values(&[role, direction, transport])
}

/// The gRPC status that tells the caller what an engine's refusal was.
pub fn status_of(e: &InferError) -> Status {
    match e {
        InferError::Overloaded(_) => Status::resource_exhausted(e.to_string()),
        InferError::Invalid(_) => Status::invalid_argument(e.to_string()),
        InferError::Unavailable(_) => Status::unavailable(e.to_string()),
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
        min_p: s.min_p,
        repetition_penalty: (s.repetition_penalty != 1.0).then_some(s.repetition_penalty),
        logit_bias: s
            .logit_bias
            .iter()
            .map(|&(token, bias)| pb::LogitBias { token, bias })
            .collect(),
        grammar_json: s
            .grammar
            .as_ref()
            .map(|g| serde_json::to_string(g).expect("a grammar serializes")),
        prompt_logprobs: s.prompt_logprobs.map(|n| n as u32),
        output_prefix: s.output_prefix as u32,
    }
}

/// The request's sampling rule; a grammar that does not parse is the
/// caller's error (`InvalidArgument`), never a worker's.
pub fn sampling_from_pb(s: pb::SamplingParams) -> Result<SamplingParams, Status> {
    let grammar = match s.grammar_json.as_deref() {
        None => None,
        Some(text) => Some(serde_json::from_str::<Grammar>(text).map_err(|e| {
            Status::invalid_argument(format!("sampling.grammar_json is not a grammar: {e}"))
        })?),
    };
    Ok(SamplingParams {
        temperature: s.temperature,
        top_k: s.top_k.map(|k| k as usize),
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
        logit_bias: s.logit_bias.iter().map(|b| (b.token, b.bias)).collect(),
        grammar,
        logprobs: s.logprobs.map(|n| n as usize),
        prompt_logprobs: s.prompt_logprobs.map(|n| n as usize),
        output_prefix: s.output_prefix as usize,
    })
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
