//! What a caller hands the engine and what it gets back. These types are the
//! contract between the HTTP layer or the gRPC decode and prefill services and the
//! scheduler; they carry token ids, never text.

use bytes::Bytes;

/// How to pick the next token. `temperature == 0.0` means greedy.
///
/// Order of application (the sampler's module documents it): grammar mask →
/// logit bias → repetition, presence and frequency penalties → logprobs →
/// greedy, or temperature, top-k, top-p, min-p and a draw.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` keeps all.
    pub top_k: Option<usize>,
    /// Nucleus sampling mass in (0, 1]; 1.0 disables it.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one, in
    /// [0, 1]; 0 disables it.
    pub min_p: f32,
    /// Seed for a reproducible sample stream; `None` draws one.
    pub seed: Option<u64>,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Multiplicative penalty on every token already in the prompt or the
    /// output (divides a positive logit, multiplies a negative one), as
    /// vLLM and transformers apply it; 1.0 disables it.
    pub repetition_penalty: f32,
    /// Added to these tokens' logits before anything else (OpenAI's
    /// `logit_bias`, in [-100, 100]: -100 bans a token, 100 all but forces it).
    pub logit_bias: Vec<(u32, f32)>,
    /// Only tokens that keep the output inside this grammar may be sampled;
    /// EOS only once the grammar is complete.
    pub grammar: Option<Grammar>,
    /// `Some(n)`: report the sampled token's log-probability and the `n` most
    /// likely alternatives (n may be 0).
    pub logprobs: Option<usize>,
    /// `Some(n)`: report every prompt token's log-probability (from the
    /// second on) with `n` alternatives, as one [`GenerateEvent::PromptLogprobs`].
    pub prompt_logprobs: Option<usize>,
    /// The last `output_prefix` prompt tokens are this request's own earlier
    /// output (a request that moved to another worker mid-generation): the
    /// penalties and the grammar count them as generated, not as prompt.
    pub output_prefix: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            grammar: None,
            logprobs: None,
            prompt_logprobs: None,
            output_prefix: 0,
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

/// A constraint on the generated text, compiled by the engine against the
/// model's vocabulary (llguidance). Travels with the request, to a prefill
/// worker too, so every sampled token obeys it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Grammar {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against this JSON Schema (its text).
    JsonSchema(String),
    /// Text matching this regular expression, whole.
    Regex(String),
    /// A grammar in llguidance's Lark dialect.
    Lark(String),
}

impl Grammar {
    /// The kind, for logs and metrics: `json_object`, `json_schema`, `regex`, `lark`.
    pub fn kind(&self) -> &'static str {
        match self {
            Grammar::JsonObject => "json_object",
            Grammar::JsonSchema(_) => "json_schema",
            Grammar::Regex(_) => "regex",
            Grammar::Lark(_) => "lark",
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
    /// The prompt tokens' log-probabilities, when `prompt_logprobs` was
    /// asked: one entry per prompt token from the second on (the first has
    /// nothing before it). Sent once, right after `Started`.
    PromptLogprobs(Vec<TokenOutput>),
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

impl KvDtype {
    /// Bytes of one value.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }

    /// `values` as little-endian bytes of this dtype: as they are for f32;
    /// rounded to nearest-even for bf16, which is exact for values a bf16
    /// pool holds (the CUDA backend's KV), so shipping half the bytes loses
    /// nothing. One pass, no intermediate copy.
    pub fn encode(self, values: &[f32]) -> Bytes {
        match self {
            KvDtype::F32 => Bytes::from_owner(PodBytes(values.to_vec())),
            KvDtype::Bf16 => {
                Bytes::from_owner(PodBytes(values.iter().map(|&x| bf16_bits(x)).collect()))
            }
        }
    }

    /// Little-endian bytes of this dtype as f32 values (widening is exact).
    /// `None` when the bytes are not whole values.
    pub fn decode(self, bytes: &[u8]) -> Option<Vec<f32>> {
        if !bytes.len().is_multiple_of(self.size()) {
            return None;
        }
        Some(match self {
            KvDtype::F32 => match bytemuck::try_cast_slice::<u8, f32>(bytes) {
                Ok(values) => values.to_vec(),
                Err(_) => bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            },
            // Widening is a shift; on aligned data it vectorises.
            KvDtype::Bf16 => match bytemuck::try_cast_slice::<u8, u16>(bytes) {
                Ok(words) => words
                    .iter()
                    .map(|&h| f32::from_bits(u32::from(h) << 16))
                    .collect(),
                Err(_) => bytes
                    .chunks_exact(2)
                    .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16))
                    .collect(),
            },
        })
    }
}

/// Owns plain values and lends them as bytes, so encoded KV becomes
/// [`Bytes`] without a copy.
struct PodBytes<T>(Vec<T>);
impl<T: bytemuck::Pod> AsRef<[u8]> for PodBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

/// f32 values as bytes, without a copy.
pub fn f32_bytes(values: Vec<f32>) -> Bytes {
    Bytes::from_owner(PodBytes(values))
}

/// `x` rounded to the nearest bf16, ties to even (as CUDA's
/// `__float2bfloat16`); NaNs stay (quiet) NaNs. Branch-free so the loop over a
/// layer vectorises: this runs over every value a prefill ships.
#[inline]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet_nan = (b >> 16) | 0x40;
    (if (b & 0x7fff_ffff) > 0x7f80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

/// A prompt's KV cache in the layout-independent transfer format (docs/architecture.md,
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
/// layer-by-layer KV streaming) or as received.
#[derive(Debug, Clone, PartialEq)]
pub struct KvLayerChunk {
    pub layer: usize,
    pub start_pos: usize,
    pub num_tokens: usize,
    /// `[num_tokens, kv_heads, head_dim]` values of the prompt's KV dtype
    /// (the pool's), little-endian bytes: what the wire carries, so a
    /// transfer passes them on without touching each value.
    pub k: Bytes,
    pub v: Bytes,
}

/// A prompt's KV as a transfer delivers it: pieces of (layer, position run)
/// of K and V as bytes of `dtype`, together covering every position of every
/// layer exactly once. Unlike [`KvExport`] nothing is widened or gathered:
/// the receiving backend installs each piece where it belongs.
#[derive(Debug, Clone, PartialEq)]
pub struct KvPieces {
    pub dtype: KvDtype,
    pub num_layers: usize,
    pub num_tokens: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub pieces: Vec<KvLayerChunk>,
}

impl KvPieces {
    /// Size of the K and V data, in bytes.
    pub fn size_bytes(&self) -> usize {
        self.pieces.iter().map(|p| p.k.len() + p.v.len()).sum()
    }

    /// Whether the pieces are whole values of the declared shape and cover
    /// every position of every layer exactly once; `Err` says what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let row = self.kv_heads * self.head_dim * self.dtype.size();
        let mut covered = vec![false; self.num_layers * self.num_tokens];
        for p in &self.pieces {
            let len = p.num_tokens * row;
            if p.layer >= self.num_layers
                || p.start_pos + p.num_tokens > self.num_tokens
                || p.k.len() != len
                || p.v.len() != len
            {
                return Err(format!(
                    "a piece of layer {} positions {}..{} with {} K and {} V bytes does not fit \
                     {} layers x {} tokens of {row} bytes",
                    p.layer,
                    p.start_pos,
                    p.start_pos + p.num_tokens,
                    p.k.len(),
                    p.v.len(),
                    self.num_layers,
                    self.num_tokens
                ));
            }
            let base = p.layer * self.num_tokens;
            for pos in p.start_pos..p.start_pos + p.num_tokens {
                if std::mem::replace(&mut covered[base + pos], true) {
                    return Err(format!("layer {} position {pos} is covered twice", p.layer));
                }
            }
        }
        match covered.iter().position(|&c| !c) {
            Some(i) => Err(format!(
                "layer {} position {} is missing",
                i / self.num_tokens.max(1),
                i % self.num_tokens.max(1)
            )),
            None => Ok(()),
        }
    }

    /// The same KV as f32 values laid out per layer (widening is exact).
    pub fn to_export(&self) -> KvExport {
        let width = self.kv_heads * self.head_dim;
        let mut layers = vec![
            (
                vec![0f32; self.num_tokens * width],
                vec![0f32; self.num_tokens * width]
            );
            self.num_layers
        ];
        for p in &self.pieces {
            let (k, v) = &mut layers[p.layer];
            let range = p.start_pos * width..(p.start_pos + p.num_tokens) * width;
            let widen = |b: &Bytes| self.dtype.decode(b).expect("checked whole values");
            k[range.clone()].copy_from_slice(&widen(&p.k));
            v[range].copy_from_slice(&widen(&p.v));
        }
        KvExport {
            dtype: KvDtype::F32,
            num_tokens: self.num_tokens,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            layers,
        }
    }
}

impl From<KvExport> for KvPieces {
    /// One piece per layer, the f32 values as they are (no copy).
    fn from(kv: KvExport) -> Self {
        let num_tokens = kv.num_tokens;
        Self {
            dtype: KvDtype::F32,
            num_layers: kv.layers.len(),
            num_tokens,
            kv_heads: kv.kv_heads,
            head_dim: kv.head_dim,
            pieces: kv
                .layers
                .into_iter()
                .enumerate()
                .map(|(layer, (k, v))| KvLayerChunk {
                    layer,
                    start_pos: 0,
                    num_tokens,
                    k: f32_bytes(k),
                    v: f32_bytes(v),
                })
                .collect(),
        }
    }
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
    PeerWritten(PeerWrite),
    /// The first generated token; every prompt position has been sent.
    Done(TokenOutput),
    Error(String),
}

/// What one copy into a peer's pool moved, and its GPU time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PeerWrite {
    pub bytes: usize,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(dtype: KvDtype, runs: &[(usize, usize, usize)]) -> KvPieces {
        // 2 layers x 4 tokens x (1 head x 2): value = layer * 100 + position.
        let width = 2;
        KvPieces {
            dtype,
            num_layers: 2,
            num_tokens: 4,
            kv_heads: 1,
            head_dim: width,
            pieces: runs
                .iter()
                .map(|&(layer, start, n)| {
                    let values: Vec<f32> = (start..start + n)
                        .flat_map(|p| [(layer * 100 + p) as f32; 2])
                        .collect();
                    let negated: Vec<f32> = values.iter().map(|x| -x).collect();
                    KvLayerChunk {
                        layer,
                        start_pos: start,
                        num_tokens: n,
                        k: dtype.encode(&values),
                        v: dtype.encode(&negated),
                    }
                })
                .collect(),
        }
    }

    #[test]
    fn pieces_in_any_order_become_the_same_per_layer_export() {
        for dtype in [KvDtype::F32, KvDtype::Bf16] {
            let kv = pieces(dtype, &[(1, 2, 2), (0, 0, 4), (1, 0, 2)]);
            kv.check().unwrap();
            assert_eq!(kv.size_bytes(), 2 * 2 * 4 * 2 * dtype.size());
            let export = kv.to_export();
            assert_eq!(export.layers[0].0, vec![0., 0., 1., 1., 2., 2., 3., 3.]);
            assert_eq!(
                export.layers[1].1,
                vec![-100., -100., -101., -101., -102., -102., -103., -103.]
            );
            // Back to one piece per layer: the same KV.
            assert_eq!(KvPieces::from(export.clone()).to_export(), export);
        }
    }

    #[test]
    fn missing_overlapping_and_misshapen_pieces_are_named() {
        let gap = pieces(KvDtype::Bf16, &[(0, 0, 4), (1, 0, 3)]).check();
        assert_eq!(gap.unwrap_err(), "layer 1 position 3 is missing");
        let twice = pieces(KvDtype::Bf16, &[(0, 0, 4), (1, 0, 3), (1, 2, 2)]).check();
        assert_eq!(twice.unwrap_err(), "layer 1 position 2 is covered twice");
        let mut short = pieces(KvDtype::F32, &[(0, 0, 4), (1, 0, 4)]);
        short.pieces[1].v.truncate(4);
        assert!(short.check().unwrap_err().contains("does not fit"));
    }

    #[test]
    fn bf16_encoding_rounds_to_nearest_even_and_decodes_exactly() {
        let values = [1.0f32, -2.5, 1.0 + 1.0 / 256.0, 3.0e-39, f32::INFINITY];
        let bytes = KvDtype::Bf16.encode(&values);
        assert_eq!(bytes.len(), 10);
        let back = KvDtype::Bf16.decode(&bytes).unwrap();
        // 1 + 2^-8 is halfway between two bf16 values: to even (1.0).
        assert_eq!(back[..3], [1.0, -2.5, 1.0]);
        assert_eq!(back[4], f32::INFINITY);
        assert_eq!(KvDtype::Bf16.decode(&bytes[..3]), None, "half a value");
        // Unaligned bytes decode the same.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&bytes);
        assert_eq!(KvDtype::Bf16.decode(&shifted[1..]).unwrap(), back);
    }
}
