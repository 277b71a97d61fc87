//! What a caller hands the engine and what it gets back. These types are the
//! contract between the HTTP layer (or, later, the gRPC decode service) and the
//! scheduler; they carry token ids, never text.

/// How to pick the next token. `temperature == 0.0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1]; 1.0 disables it.
    pub top_p: f32,
    /// Seed for a reproducible sample stream; `None` draws one.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// `Some(n)`: report the sampled token's log-probability and the `n` most
    /// likely alternatives (n may be 0).
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }
}

/// When the engine stops a sequence by itself. Stop *strings* are text-level and
/// are checked by the caller, which cancels the request when one matches.
#[derive(Debug, Clone, PartialEq)]
pub struct StopParams {
    pub max_tokens: usize,
    /// Extra token ids that end generation (the model's EOS ids always do,
    /// unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Caller-chosen id, unique among in-flight requests; used in logs.
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOutput {
    pub id: u32,
    /// Log-probability of `id` (natural log), when logprobs were requested.
    pub logprob: Option<f32>,
    /// The most likely alternatives, best first, when logprobs were requested.
    pub top_logprobs: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// EOS or a stop token id was generated (the stop token is not emitted).
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    /// The caller cancelled (dropped its stream).
    Cancelled,
}

/// Events of one request, in order: `Started`, then zero or more `Token`, then
/// exactly one `Finished` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum GenerateEvent {
    /// The prompt was admitted; `cached_tokens` of it came from the prefix cache.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Token(TokenOutput),
    Finished(FinishReason),
    Error(String),
}

/// Element type of KV data: of a backend's pool, of data on the wire.
/// A [`KvExport`] always holds f32 values (`F32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    F32,
    Bf16,
}

/// A prompt's KV cache in the layout-independent transfer format (DESIGN.md
/// "KV transfer"): per layer, K and V as `[num_tokens, kv_heads, head_dim]`,
/// positions `0 .. num_tokens`. Independent of either side's block size.
#[derive(Debug, Clone, PartialEq)]
pub struct KvExport {
    pub dtype: KvDtype,
    pub num_tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// `(K, V)` per layer.
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvExport {
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Size of the K and V data of all layers, in bytes.
    pub fn size_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| (k.len() + v.len()) * std::mem::size_of::<f32>())
            .sum()
    }
}

/// What a prefill-only run returns: the first generated token and the prompt's KV.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefillOutput {
    pub first_token: TokenOutput,
    pub kv: KvExport,
    /// Prompt tokens that came from the prefix cache instead of being computed.
    pub cached_tokens: usize,
}

/// K and V of one layer for a run of positions, as computed (the unit of
/// layer-by-layer KV streaming).
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayerChunk {
    pub layer: usize,
    pub start_pos: usize,
    pub num_tokens: usize,
    /// `[num_tokens, kv_heads, head_dim]`.
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// Events of a streamed prefill, in order: `Started`, `Kv` chunks (each layer's
/// K and V as soon as that layer is computed; positions served from the prefix
/// cache come first; after a preemption a position may be sent again, with the
/// same values), then exactly one `Done` or `Error`.
#[derive(Debug, Clone, PartialEq)]
pub enum PrefillEvent {
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    Kv(KvLayerChunk),
    /// The prompt's KV (every position) went straight into a peer worker's
    /// pool (cuda-ipc) instead of `Kv` chunks; the copy has finished.
    PeerWritten(crate::engine::backend::cuda::ipc::PeerWrite),
    /// The first generated token; every prompt position has been sent.
    Done(TokenOutput),
    Error(String),
}
