//! GGUF file → model: metadata to [`ModelConfig`], tensors to [`Weights`]
//! (dequantized to f32, Q/K un-permuted to HF's half-split RoPE layout, put
//! together by [`assemble`] under llama.cpp's [`NAMES`]), vocabulary to
//! [`Tokenizer`], embedded chat template.

use std::collections::BTreeMap;

use super::assemble::{self, LayerPart, Names, TensorSource, WeightId};
use super::config::Llama3RopeScaling;
use super::gguf::{GgufFile, MetadataValue, TensorInfo};
use super::tokenizer::{ByteLevelBpeVocab, SentencePieceVocab, Tokenizer};
use super::{Architecture, ModelConfig, ModelError, Tensor, Weights};

const DEFAULT_ROPE_THETA: f32 = 10_000.0;
/// Per-frequency RoPE divisors llama.cpp writes for Llama 3.1+ scaling.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// llama.cpp's divisor for each RoPE frequency under Llama 3 scaling (the HF
/// "llama3" rope type): 1 for short wavelengths, `factor` for long ones, and
/// an interpolation between.
pub fn llama3_rope_factors(s: &Llama3RopeScaling, head_dim: usize, theta: f32) -> Vec<f32> {
    let old = s.original_max_position_embeddings as f64;
    let low_wavelen = old / s.low_freq_factor as f64;
    let high_wavelen = old / s.high_freq_factor as f64;
    (0..head_dim / 2)
        .map(|i| {
            let freq = (theta as f64).powf(-((2 * i) as f64) / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let factor = s.factor as f64;
            let r = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (old / wavelen - s.low_freq_factor as f64)
                    / (s.high_freq_factor - s.low_freq_factor) as f64;
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            r as f32
        })
        .collect()
}

/// Recovers Llama 3 scaling parameters from llama.cpp's per-frequency
/// divisors. Only the ratios `original/low` and `original/high` shape the
/// factors, so `low_freq_factor` is taken as 1 (Llama 3.x's value); the
/// rest follows from two interpolated frequencies. `None` unless the
/// parameters found reproduce every factor.
pub fn llama3_scaling_from_factors(
    factors: &[f32],
    head_dim: usize,
    theta: f32,
) -> Option<Llama3RopeScaling> {
    if factors.len() != head_dim / 2 {
        return None;
    }
    // NaN-free factors only; the largest is the scaling factor itself.
    if factors.iter().any(|r| !r.is_finite()) {
        return None;
    }
    let factor = factors.iter().copied().fold(1.0, f32::max);
    if factor <= 1.0 {
        return None;
    }
    // In the interpolated band, smooth = a / wavelen - b, linear in 1/wavelen.
    let inv_wavelen = |i: usize| {
        let freq = (theta as f64).powf(-((2 * i) as f64) / head_dim as f64);
        freq / (2.0 * std::f64::consts::PI)
    };
    let band: Vec<(f64, f64)> = factors
        .iter()
        .enumerate()
        .filter(|(_, &r)| r > 1.0 + 1e-4 && r < factor - 1e-4)
        .map(|(i, &r)| {
            let smooth = (1.0 / r as f64 - 1.0 / factor as f64) / (1.0 - 1.0 / factor as f64);
            (inv_wavelen(i), smooth)
        })
        .collect();
    let (&(x0, y0), &(x1, y1)) = (band.first()?, band.last()?);
    if band.len() < 2 || (x1 - x0).abs() < 1e-12 {
        return None;
    }
    let a = (y1 - y0) / (x1 - x0);
    let b = a * x0 - y0;
    if a <= 0.0 || b <= 0.0 {
        return None;
    }
    // smooth = (old/wavelen - low)/(high - low) with low = 1: a = old/(high-1), b = 1/(high-1).
    let scaling = Llama3RopeScaling {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: (1.0 + 1.0 / b) as f32,
        original_max_position_embeddings: (a / b).round() as usize,
    };
    let again = llama3_rope_factors(&scaling, head_dim, theta);
    let close = again
        .iter()
        .zip(factors)
        .all(|(x, y)| (x - y).abs() <= 1e-3 * y.abs().max(1.0));
    close.then_some(scaling)
}

/// The GGUF architecture name (`general.architecture`) and ours.
fn architecture(f: &GgufFile) -> Result<(&str, Architecture), ModelError> {
    let name = meta_str(f, "general.architecture")?;
    let arch = match name {
        // llama.cpp's converter writes Mistral models as "llama" too.
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(ModelError::UnsupportedArchitecture {
                path: f.path().to_path_buf(),
                architecture: other.to_string(),
            })
        }
    };
    Ok((name, arch))
}

fn meta<'a>(f: &'a GgufFile, key: &str) -> Result<&'a MetadataValue, ModelError> {
    f.get(key).ok_or_else(|| ModelError::MissingMetadata {
        path: f.path().to_path_buf(),
        key: key.to_string(),
    })
}

fn bad_meta(f: &GgufFile, key: &str, why: &str) -> ModelError {
    ModelError::BadMetadata {
        path: f.path().to_path_buf(),
        key: key.to_string(),
        why: why.to_string(),
    }
}

fn meta_str<'a>(f: &'a GgufFile, key: &str) -> Result<&'a str, ModelError> {
    meta(f, key)?
        .as_str()
        .ok_or_else(|| bad_meta(f, key, "expected a string"))
}

fn meta_usize(f: &GgufFile, key: &str) -> Result<usize, ModelError> {
    meta(f, key)?
        .as_u64()
        .map(|v| v as usize)
        .ok_or_else(|| bad_meta(f, key, "expected a non-negative integer"))
}

fn meta_f32(f: &GgufFile, key: &str) -> Result<f32, ModelError> {
    meta(f, key)?
        .as_f64()
        .map(|v| v as f32)
        .ok_or_else(|| bad_meta(f, key, "expected a number"))
}

fn optional<T>(r: Result<T, ModelError>) -> Result<Option<T>, ModelError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(ModelError::MissingMetadata { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads the model shape from `{arch}.*` metadata, refusing RoPE variants the
/// engine does not implement.
pub fn config(f: &GgufFile) -> Result<ModelConfig, ModelError> {
    let (a, architecture) = architecture(f)?;
    let key = |k: &str| format!("{a}.{k}");
    let hidden_size = meta_usize(f, &key("embedding_length"))?;
    let num_heads = meta_usize(f, &key("attention.head_count"))?;
    if num_heads == 0 || hidden_size % num_heads != 0 {
        return Err(bad_meta(
            f,
            &key("attention.head_count"),
            "must divide the embedding length",
        ));
    }
    let num_kv_heads =
        optional(meta_usize(f, &key("attention.head_count_kv")))?.unwrap_or(num_heads);
    if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
        return Err(bad_meta(
            f,
            &key("attention.head_count_kv"),
            "must divide the head count",
        ));
    }
    let head_dim =
        optional(meta_usize(f, &key("attention.key_length")))?.unwrap_or(hidden_size / num_heads);
    if let Some(rot) = optional(meta_usize(f, &key("rope.dimension_count")))? {
        if rot != head_dim {
            return Err(ModelError::Unsupported {
                path: f.path().to_path_buf(),
                what: format!("partial rotary embedding ({rot} of {head_dim} head dims)"),
            });
        }
    }
    if let Some(kind) = optional(meta_str(f, &key("rope.scaling.type")))? {
        if kind != "none" {
            return Err(ModelError::Unsupported {
                path: f.path().to_path_buf(),
                what: format!("RoPE scaling type \"{kind}\""),
            });
        }
    }
    let rope_theta = optional(meta_f32(f, &key("rope.freq_base")))?.unwrap_or(DEFAULT_ROPE_THETA);
    let rope_scaling = match f.tensor_info(ROPE_FREQS) {
        None => None,
        Some(_) => {
            let (_, factors) = f.tensor_f32(ROPE_FREQS)?;
            let scaling = llama3_scaling_from_factors(&factors, head_dim, rope_theta);
            Some(scaling.ok_or_else(|| ModelError::Unsupported {
                path: f.path().to_path_buf(),
                what: format!(
                    "RoPE frequency factors ({ROPE_FREQS}) that are not Llama 3 \"llama3\" \
                     scaling; load the HF directory of this model instead"
                ),
            })?)
        }
    };
    let vocab_size = match optional(meta_usize(f, &key("vocab_size")))? {
        Some(v) => v,
        None => f
            .tensor_info(NAMES.embed)
            .map(|t| t.shape()[0])
            .ok_or_else(|| missing_tensor(f, NAMES.embed))?,
    };
    Ok(ModelConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size: meta_usize(f, &key("feed_forward_length"))?,
        num_layers: meta_usize(f, &key("block_count"))?,
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta,
        rope_scaling,
        rms_norm_eps: meta_f32(f, &key("attention.layer_norm_rms_epsilon"))?,
        max_position_embeddings: meta_usize(f, &key("context_length"))?,
        tie_word_embeddings: f.tensor_info(NAMES.output).is_none(),
        attention_bias: f
            .tensor_info(&NAMES.name(WeightId::Layer(0, LayerPart::QBias)))
            .is_some(),
    })
}

fn missing_tensor(f: &GgufFile, name: &str) -> ModelError {
    ModelError::MissingTensor {
        path: f.path().to_path_buf(),
        name: name.to_string(),
    }
}

/// Converts a Q or K projection (or its bias, `cols == 1`) from GGUF's layout
/// back to HF's. llama.cpp's converter reorders the rows of each head so that
/// the two halves HF rotates together (`i` and `i + head_dim/2`) become the
/// adjacent pair `2i, 2i+1` that ggml's interleaved RoPE rotates; in numpy,
/// `w.reshape(n_head, 2, head_dim/2, cols).swapaxes(1, 2)`. This undoes it:
/// HF row `half * head_dim/2 + i` of a head is GGUF row `2i + half`.
pub fn unpermute_qk(data: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    reorder_rows(data, n_head, head_dim, cols, |half, i| {
        (half * head_dim / 2 + i, 2 * i + half)
    })
}

/// HF layout → GGUF layout, the inverse of [`unpermute_qk`] (what llama.cpp's
/// converter does); used to write GGUF test models.
pub fn permute_qk(data: &[f32], n_head: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    reorder_rows(data, n_head, head_dim, cols, |half, i| {
        (2 * i + half, half * head_dim / 2 + i)
    })
}

/// `map(half, i) = (destination row, source row)` within each head.
fn reorder_rows(
    data: &[f32],
    n_head: usize,
    head_dim: usize,
    cols: usize,
    map: impl Fn(usize, usize) -> (usize, usize),
) -> Vec<f32> {
    assert_eq!(data.len(), n_head * head_dim * cols, "Q/K shape mismatch");
    assert!(head_dim.is_multiple_of(2), "RoPE needs an even head_dim");
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        let base = h * head_dim;
        for half in 0..2 {
            for i in 0..head_dim / 2 {
                let (dst, src) = map(half, i);
                let (dst, src) = ((base + dst) * cols, (base + src) * cols);
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// The heads whose rows llama.cpp reordered in tensor `id` of a model of
/// `cfg` ([`permute_qk`]): the Q and K projections and biases of "llama"
/// files, whose ggml RoPE is interleaved; `None` for every other tensor, and
/// for Qwen2, which uses ggml's NEOX RoPE (half-split, as HF).
pub fn permuted_heads(cfg: &ModelConfig, id: WeightId) -> Option<usize> {
    match (cfg.architecture, id) {
        (Architecture::Llama | Architecture::Mistral, WeightId::Layer(_, part)) => {
            part.rope_heads(cfg)
        }
        _ => None,
    }
}

/// What llama.cpp calls each tensor in a GGUF file.
pub const NAMES: Names = Names {
    embed: "token_embd.weight",
    final_norm: "output_norm.weight",
    output: "output.weight",
    layer_prefix: "blk.",
    layer: [
        "attn_norm.weight",
        "attn_q.weight",
        "attn_k.weight",
        "attn_v.weight",
        "attn_q.bias",
        "attn_k.bias",
        "attn_v.bias",
        "attn_output.weight",
        "ffn_norm.weight",
        "ffn_gate.weight",
        "ffn_up.weight",
        "ffn_down.weight",
    ],
};

/// A tensor's info, refusing a missing tensor or a type this crate does not decode.
fn supported_tensor<'a>(f: &'a GgufFile, name: &str) -> Result<&'a TensorInfo, ModelError> {
    let info = f.tensor_info(name).ok_or_else(|| missing_tensor(f, name))?;
    if !info.ggml_type.is_supported() {
        return Err(ModelError::UnsupportedTensorType {
            path: f.path().to_path_buf(),
            name: name.to_string(),
            ggml_type: info.ggml_type.name(),
        });
    }
    Ok(info)
}

/// A GGUF file's tensors, decoded to f32 with Q/K back in HF's layout.
struct GgufTensors<'a> {
    file: &'a GgufFile,
    cfg: &'a ModelConfig,
}

impl TensorSource for GgufTensors<'_> {
    const NAMES: &'static Names = &NAMES;

    fn check(&self, name: &str) -> Result<(), ModelError> {
        supported_tensor(self.file, name).map(|_| ())
    }

    fn load(&self, id: WeightId, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let f = self.file;
        let info = supported_tensor(f, name)?;
        // A 1-D GGUF tensor may be stored as [n, 1, ...]; compare without unit dims.
        let squeeze = |s: &[usize]| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>();
        if squeeze(&info.shape()) != squeeze(shape) {
            return Err(ModelError::TensorShape {
                path: f.path().to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape(),
            });
        }
        let (_, mut data) = f.tensor_f32(name)?;
        if let Some(n_head) = permuted_heads(self.cfg, id) {
            let cols = if shape.len() == 2 { shape[1] } else { 1 };
            data = unpermute_qk(&data, n_head, self.cfg.head_dim, cols);
        }
        Ok(Tensor::new(shape.to_vec(), data))
    }
}

/// Every tensor of the model, decoded to f32 in HF layout. `on_tensor` is
/// called once per tensor loaded (for progress).
pub fn weights(
    f: &GgufFile,
    cfg: &ModelConfig,
    on_tensor: &(dyn Fn() + Sync),
) -> Result<Weights, ModelError> {
    assemble::assemble(cfg, &GgufTensors { file: f, cfg }, on_tensor)
}

/// The GGUF names of every tensor [`weights`] reads, in file order.
pub fn expected_tensor_names(cfg: &ModelConfig) -> Vec<String> {
    NAMES.all(cfg)
}

fn string_array(f: &GgufFile, key: &str) -> Result<Vec<String>, ModelError> {
    meta(f, key)?
        .as_array()
        .and_then(|items| {
            items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .ok_or_else(|| bad_meta(f, key, "expected an array of strings"))
}

/// The tokenizer described by `tokenizer.ggml.*`.
pub fn tokenizer(f: &GgufFile) -> Result<Tokenizer, ModelError> {
    let model = meta_str(f, "tokenizer.ggml.model")?;
    if model != "gpt2" && model != "llama" {
        return Err(ModelError::Unsupported {
            path: f.path().to_path_buf(),
            what: format!(
                "tokenizer model \"{model}\" (supported: \"gpt2\" byte-level BPE and \"llama\" \
                 SentencePiece BPE; for others use the model's HF directory with its tokenizer.json)"
            ),
        });
    }
    let tokens = string_array(f, "tokenizer.ggml.tokens")?;
    let token_types = match f.get("tokenizer.ggml.token_type") {
        None => Vec::new(),
        Some(v) => v
            .as_array()
            .and_then(|items| items.iter().map(|t| t.as_i64().map(|t| t as i32)).collect())
            .ok_or_else(|| bad_meta(f, "tokenizer.ggml.token_type", "expected integers"))?,
    };
    let id = |k: &str| -> Result<Option<u32>, ModelError> {
        Ok(optional(meta_usize(f, k))?.map(|v| v as u32))
    };
    let flag = |k: &str| f.get(k).and_then(MetadataValue::as_bool);
    let bos_token_id = id("tokenizer.ggml.bos_token_id")?;
    // Generation also ends at end-of-turn / end-of-message tokens (Llama 3
    // chats end with <|eot_id|>, which is not its eos_token_id in older files).
    let mut eos_token_ids: Vec<u32> = Vec::new();
    for key in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(eos) = id(key)? {
            if !eos_token_ids.contains(&eos) {
                eos_token_ids.push(eos);
            }
        }
    }
    let built = if model == "llama" {
        let key = "tokenizer.ggml.scores";
        let scores = meta(f, key)?
            .as_array()
            .and_then(|items| items.iter().map(|v| v.as_f64().map(|s| s as f32)).collect())
            .ok_or_else(|| bad_meta(f, key, "expected an array of numbers"))?;
        Tokenizer::from_sentencepiece(SentencePieceVocab {
            tokens,
            scores,
            token_types,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
            bos_token_id,
            eos_token_ids,
            // llama.cpp adds BOS to SentencePiece vocabularies unless told otherwise.
            add_bos_token: flag("tokenizer.ggml.add_bos_token").unwrap_or(true),
        })
    } else {
        Tokenizer::from_byte_level_bpe(ByteLevelBpeVocab {
            tokens,
            token_types,
            merges: string_array(f, "tokenizer.ggml.merges")?,
            pre: optional(meta_str(f, "tokenizer.ggml.pre"))?.map(str::to_string),
            bos_token_id,
            eos_token_ids,
            // llama.cpp's default for BPE vocabularies when the flag is absent.
            add_bos_token: flag("tokenizer.ggml.add_bos_token").unwrap_or(false),
        })
    };
    built.map_err(|cause| ModelError::Tokenizer {
        path: f.path().to_path_buf(),
        cause,
    })
}

/// The Jinja chat template embedded in the file, if any.
pub fn chat_template_source(f: &GgufFile) -> Option<String> {
    f.get("tokenizer.chat_template")
        .and_then(MetadataValue::as_str)
        .map(str::to_string)
}

/// A label for how the weights are stored: llama.cpp's `general.file_type`
/// when present, else the type holding most matrix elements, or "mixed ...".
pub fn quantization_label(f: &GgufFile) -> String {
    const FILE_TYPES: &[(u64, &str)] = &[
        (0, "F32"),
        (1, "F16"),
        (2, "Q4_0"),
        (3, "Q4_1"),
        (7, "Q8_0"),
        (8, "Q5_0"),
        (9, "Q5_1"),
        (10, "Q2_K"),
        (11, "Q3_K_S"),
        (12, "Q3_K_M"),
        (13, "Q3_K_L"),
        (14, "Q4_K_S"),
        (15, "Q4_K_M"),
        (16, "Q5_K_S"),
        (17, "Q5_K_M"),
        (18, "Q6_K"),
        (32, "BF16"),
    ];
    if let Some(ft) = f.get("general.file_type").and_then(MetadataValue::as_u64) {
        if let Some((_, name)) = FILE_TYPES.iter().find(|(id, _)| *id == ft) {
            return name.to_string();
        }
    }
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for t in f.tensors.iter().filter(|t| t.dims.len() >= 2) {
        *by_type.entry(t.ggml_type.name()).or_default() += t.numel();
    }
    mixed_label(by_type)
}

/// "X" when one type holds every element, else "mixed X+Y" by descending share.
pub(crate) fn mixed_label(by_type: BTreeMap<String, usize>) -> String {
    let mut types: Vec<_> = by_type.into_iter().collect();
    types.sort_by_key(|t| std::cmp::Reverse(t.1));
    match types.len() {
        0 => "unknown".to_string(),
        1 => types[0].0.clone(),
        _ => format!(
            "mixed {}",
            types
                .iter()
                .map(|t| t.0.as_str())
                .collect::<Vec<_>>()
                .join("+")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_is_recovered_from_llama_cpp_rope_factors() {
        // Llama 3.1 8B: head_dim 128, theta 500000, factor 8, low 1, high 4, 8192.
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let factors = llama3_rope_factors(&s, 128, 500_000.0);
        assert_eq!(factors[0], 1.0);
        assert_eq!(factors[63], 8.0);
        let back = llama3_scaling_from_factors(&factors, 128, 500_000.0).unwrap();
        assert_eq!(back.factor, 8.0);
        assert_eq!(back.original_max_position_embeddings, 8192);
        assert!((back.high_freq_factor - 4.0).abs() < 1e-3, "{back:?}");
        // Factors that are not llama3-shaped are refused.
        let mut odd = factors.clone();
        odd[10] = 3.0;
        assert!(llama3_scaling_from_factors(&odd, 128, 500_000.0).is_none());
        assert!(llama3_scaling_from_factors(&[1.0; 64], 128, 500_000.0).is_none());
    }

    #[test]
    fn unpermute_matches_a_hand_worked_head() {
        // One head, head_dim 4, one column. HF rows [a0 a1 | b0 b1] (halves
        // rotated together: a0 with b0, a1 with b1). llama.cpp's permute makes
        // the pairs adjacent: [a0 b0 a1 b1].
        let hf = [10.0, 11.0, 20.0, 21.0];
        let gguf = [10.0, 20.0, 11.0, 21.0];
        assert_eq!(permute_qk(&hf, 1, 4, 1), gguf);
        assert_eq!(unpermute_qk(&gguf, 1, 4, 1), hf);
    }

    #[test]
    fn permute_matches_numpy_reshape_swapaxes() {
        // numpy: w.reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape)
        let (n_head, hd, cols) = (3, 6, 2);
        let w: Vec<f32> = (0..n_head * hd * cols).map(|x| x as f32).collect();
        let mut numpy = Vec::new();
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for half in 0..2 {
                    let row = h * hd + half * hd / 2 + i;
                    numpy.extend_from_slice(&w[row * cols..(row + 1) * cols]);
                }
            }
        }
        assert_eq!(permute_qk(&w, n_head, hd, cols), numpy);
        assert_eq!(
            unpermute_qk(&permute_qk(&w, n_head, hd, cols), n_head, hd, cols),
            w
        );
        assert_ne!(permute_qk(&w, n_head, hd, cols), w);
    }
}
