//! Tiny random models for tests across the crate: random weights, and savers
//! that write them as a GGUF file or an HF directory that [`super::load`]
//! reads back, each with a small byte-level BPE tokenizer and a ChatML template.

use std::borrow::Cow;
use std::path::Path;

use rand::{Rng, SeedableRng};

use super::assemble::WeightId;
use super::gguf::{write_gguf, GgufFile, MetadataValue, TensorData};
use super::gguf_model::{self, llama3_rope_factors, permute_qk, ROPE_FREQS};
use super::hf;
use super::quant::GgmlType;
use super::tokenizer::{ByteLevelBpeVocab, Tokenizer};
use super::{Architecture, LayerWeights, ModelConfig, ModelError, Tensor, Weights};

/// The chat template the test models carry.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Special tokens of the tiny tokenizer, ids 0, 1, 2 (BOS is 1, EOS is 2).
const TINY_SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// A few merges, so encoding really exercises BPE.
const TINY_MERGES: [(&str, &str); 4] = [("Ġ", "t"), ("h", "e"), ("i", "n"), ("Ġt", "he")];

/// Smallest `vocab_size` a test model with the tiny tokenizer can have:
/// 3 special tokens, 256 byte tokens, 4 merges.
pub const TINY_TOKENIZER_VOCAB: usize = TINY_SPECIALS.len() + 256 + TINY_MERGES.len();

/// A small Llama-shaped config (GQA, untied head) for tests to adjust.
pub fn tiny_config(architecture: Architecture) -> ModelConfig {
    ModelConfig {
        architecture,
        vocab_size: TINY_TOKENIZER_VOCAB,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        attention_bias: architecture == Architecture::Qwen2,
    }
}

/// Random weights of the shape `cfg` describes, the same for the same seed.
/// Matrices are uniform in ±1/sqrt(fan_in) so activations stay O(1); norm
/// weights are near 1.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut matrix = |rows: usize, cols: usize| {
        let bound = 1.0 / (cols as f32).sqrt();
        let data = (0..rows * cols)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Tensor::new(vec![rows, cols], data)
    };
    let h = cfg.hidden_size;
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let ff = cfg.intermediate_size;
    let embed_tokens = matrix(cfg.vocab_size, h);
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        let wq = matrix(q, h);
        let wk = matrix(kv, h);
        let wv = matrix(kv, h);
        let wo = matrix(h, q);
        let w_gate = matrix(ff, h);
        let w_up = matrix(ff, h);
        let w_down = matrix(h, ff);
        layers.push(LayerWeights {
            attn_norm: Tensor::zeros(vec![h]),
            wq,
            wk,
            wv,
            bq: None,
            bk: None,
            bv: None,
            wo,
            ffn_norm: Tensor::zeros(vec![h]),
            w_gate,
            w_up,
            w_down,
        });
    }
    let lm_head = (!cfg.tie_word_embeddings).then(|| matrix(cfg.vocab_size, h));
    let mut weights = Weights {
        embed_tokens,
        layers,
        final_norm: Tensor::zeros(vec![h]),
        lm_head,
    };
    let mut norm = |t: &mut Tensor| {
        t.data
            .iter_mut()
            .for_each(|x| *x = 1.0 + rng.random_range(-0.1..0.1))
    };
    for l in &mut weights.layers {
        norm(&mut l.attn_norm);
        norm(&mut l.ffn_norm);
    }
    norm(&mut weights.final_norm);
    if cfg.attention_bias {
        let mut bias = |n: usize| {
            Tensor::new(
                vec![n],
                (0..n).map(|_| rng.random_range(-0.1..0.1)).collect(),
            )
        };
        for l in &mut weights.layers {
            l.bq = Some(bias(q));
            l.bk = Some(bias(kv));
            l.bv = Some(bias(kv));
        }
    }
    weights
}

/// GPT-2's byte → printable character map used by byte-level BPE vocabularies.
fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        return char::from(b);
    }
    let shifted = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + shifted).expect("valid char")
}

/// The tiny tokenizer's vocabulary, padded with unused tokens to `vocab_size`.
pub fn tiny_vocab(vocab_size: usize) -> ByteLevelBpeVocab {
    assert!(
        vocab_size >= TINY_TOKENIZER_VOCAB,
        "test models need vocab_size >= {TINY_TOKENIZER_VOCAB}"
    );
    let mut tokens: Vec<String> = TINY_SPECIALS.iter().map(|s| s.to_string()).collect();
    let mut types = vec![3; TINY_SPECIALS.len()];
    tokens.extend((0..=255u8).map(|b| byte_to_char(b).to_string()));
    tokens.extend(TINY_MERGES.iter().map(|(a, b)| format!("{a}{b}")));
    types.resize(tokens.len(), 1);
    for i in tokens.len()..vocab_size {
        tokens.push(format!("<|unused_{i}|>"));
        types.push(5);
    }
    ByteLevelBpeVocab {
        tokens,
        token_types: types,
        merges: TINY_MERGES
            .iter()
            .map(|(a, b)| format!("{a} {b}"))
            .collect(),
        pre: Some("gpt2".to_string()),
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos_token: false,
    }
}

/// Which vocabulary a saved GGUF test model carries.
#[derive(Debug, Clone, Copy)]
pub enum TokenizerSource<'a> {
    /// The tiny byte-level BPE of this module (needs `vocab_size >= TINY_TOKENIZER_VOCAB`).
    Tiny,
    /// Every `tokenizer.*` key of another GGUF file (e.g. the default model,
    /// to run real prompts through random weights); `vocab_size` must match it.
    CopyFrom(&'a Path),
}

fn gguf_arch(cfg: &ModelConfig) -> &'static str {
    match cfg.architecture {
        // llama.cpp writes Mistral as llama.
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
    }
}

/// Saves as GGUF with every matrix stored as F32 (exact round trip).
pub fn save_gguf(
    path: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: TokenizerSource,
) -> Result<(), ModelError> {
    save_gguf_as(path, cfg, weights, tokenizer, GgmlType::F32)
}

/// Saves as GGUF with 2-D tensors stored as `matrix_type` (norms and biases
/// stay F32, as llama.cpp does), Q/K permuted and Llama 3 RoPE scaling
/// written as `rope_freqs.weight`, as llama.cpp's converter does.
pub fn save_gguf_as(
    path: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
    tokenizer: TokenizerSource,
    matrix_type: GgmlType,
) -> Result<(), ModelError> {
    let a = gguf_arch(cfg);
    let u32v = |v: usize| MetadataValue::U32(v as u32);
    let mut meta: Vec<(String, MetadataValue)> = vec![
        (
            "general.architecture".into(),
            MetadataValue::String(a.into()),
        ),
        (
            "general.name".into(),
            MetadataValue::String("tandem test model".into()),
        ),
        (format!("{a}.block_count"), u32v(cfg.num_layers)),
        (
            format!("{a}.context_length"),
            u32v(cfg.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u32v(cfg.hidden_size)),
        (
            format!("{a}.feed_forward_length"),
            u32v(cfg.intermediate_size),
        ),
        (format!("{a}.attention.head_count"), u32v(cfg.num_heads)),
        (
            format!("{a}.attention.head_count_kv"),
            u32v(cfg.num_kv_heads),
        ),
        (format!("{a}.attention.key_length"), u32v(cfg.head_dim)),
        (format!("{a}.attention.value_length"), u32v(cfg.head_dim)),
        (format!("{a}.rope.dimension_count"), u32v(cfg.head_dim)),
        (
            format!("{a}.rope.freq_base"),
            MetadataValue::F32(cfg.rope_theta),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            MetadataValue::F32(cfg.rms_norm_eps),
        ),
        (format!("{a}.vocab_size"), u32v(cfg.vocab_size)),
    ];
    match tokenizer {
        TokenizerSource::Tiny => {
            let v = tiny_vocab(cfg.vocab_size);
            let s = MetadataValue::String;
            meta.extend([
                ("tokenizer.ggml.model".into(), s("gpt2".into())),
                (
                    "tokenizer.ggml.pre".into(),
                    s(v.pre.clone().unwrap_or_default()),
                ),
                (
                    "tokenizer.ggml.tokens".into(),
                    MetadataValue::strings(v.tokens),
                ),
                (
                    "tokenizer.ggml.token_type".into(),
                    MetadataValue::i32s(v.token_types),
                ),
                (
                    "tokenizer.ggml.merges".into(),
                    MetadataValue::strings(v.merges),
                ),
                ("tokenizer.ggml.bos_token_id".into(), MetadataValue::U32(1)),
                ("tokenizer.ggml.eos_token_id".into(), MetadataValue::U32(2)),
                (
                    "tokenizer.ggml.add_bos_token".into(),
                    MetadataValue::Bool(false),
                ),
                ("tokenizer.chat_template".into(), s(CHATML_TEMPLATE.into())),
            ]);
        }
        TokenizerSource::CopyFrom(src) => {
            let f = GgufFile::open(src)?;
            meta.extend(
                f.metadata
                    .iter()
                    .filter(|(k, _)| k.starts_with("tokenizer."))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
    }

    let mut tensors = Vec::new();
    let mut push = |name: String, t: &Tensor, ty: GgmlType| -> Result<(), ModelError> {
        let ty = if t.shape.len() >= 2 {
            ty
        } else {
            GgmlType::F32
        };
        tensors.push(TensorData::from_f32(name, t.shape.clone(), ty, &t.data)?);
        Ok(())
    };
    for (id, t) in weights.tensors() {
        if id == WeightId::FinalNorm {
            if let Some(scaling) = &cfg.rope_scaling {
                // llama.cpp stores Llama 3 scaling as per-frequency divisors.
                let factors = llama3_rope_factors(scaling, cfg.head_dim, cfg.rope_theta);
                let t = Tensor::new(vec![factors.len()], factors);
                push(ROPE_FREQS.into(), &t, GgmlType::F32)?;
            }
        }
        let t = match gguf_model::permuted_heads(cfg, id) {
            Some(n_head) => {
                let cols = if t.shape.len() == 2 { t.shape[1] } else { 1 };
                let data = permute_qk(&t.data, n_head, cfg.head_dim, cols);
                Cow::Owned(Tensor::new(t.shape.clone(), data))
            }
            None => Cow::Borrowed(t),
        };
        push(gguf_model::NAMES.name(id), &t, matrix_type)?;
    }
    write_gguf(path, &meta, &tensors)?;
    Ok(())
}

/// Saves as an HF directory: `config.json`, one F32 `model.safetensors`,
/// `tokenizer.json` (the tiny tokenizer), `tokenizer_config.json` with ChatML.
pub fn save_hf_dir(dir: &Path, cfg: &ModelConfig, weights: &Weights) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |cause| ModelError::Io { path, cause }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut config = serde_json::json!({
        "model_type": cfg.architecture.to_string(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": 1,
        "eos_token_id": 2,
    });
    if let Some(s) = cfg.rope_scaling {
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings,
        });
    }
    let write = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(io(&p))
    };
    write(
        "config.json",
        serde_json::to_string_pretty(&config).expect("json"),
    )?;

    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .tensors()
        .into_iter()
        .map(|(id, t)| {
            let bytes = bytemuck::cast_slice(&t.data).to_vec();
            (hf::NAMES.name(id), t.shape.clone(), bytes)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ModelError::Invalid {
            path: dir.to_path_buf(),
            why: e.to_string(),
        })?;
    let st = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, None, &st).map_err(|e| ModelError::Invalid {
        path: st.clone(),
        why: e.to_string(),
    })?;

    let tokenizer =
        Tokenizer::from_byte_level_bpe(tiny_vocab(cfg.vocab_size)).map_err(|cause| {
            ModelError::Tokenizer {
                path: dir.to_path_buf(),
                cause,
            }
        })?;
    let tok_json = tokenizer
        .inner()
        .to_string(false)
        .map_err(|e| ModelError::Invalid {
            path: dir.join("tokenizer.json"),
            why: e.to_string(),
        })?;
    write("tokenizer.json", tok_json)?;
    let tok_cfg = serde_json::json!({
        "add_bos_token": false,
        "bos_token": TINY_SPECIALS[1],
        "eos_token": TINY_SPECIALS[2],
        "chat_template": CHATML_TEMPLATE,
    });
    write(
        "tokenizer_config.json",
        serde_json::to_string_pretty(&tok_cfg).expect("json"),
    )?;
    Ok(())
}
