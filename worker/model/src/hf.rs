//! Hugging Face model directories: `config.json`, `*.safetensors` (single or
//! sharded with `model.safetensors.index.json`; their tensors put together by
//! [`assemble`] under HF's [`NAMES`]), `tokenizer.json`, and the chat template
//! and special tokens from `tokenizer_config.json` / `generation_config.json`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use serde_json::Value;

use super::assemble::{self, Names, TensorSource, WeightId};
use super::config::Llama3RopeScaling;
use super::tokenizer::Tokenizer;
use super::{Architecture, ModelConfig, ModelError, Tensor, Weights};

pub const CONFIG_FILE: &str = "config.json";
const INDEX_FILE: &str = "model.safetensors.index.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
const GENERATION_CONFIG_FILE: &str = "generation_config.json";
const CHAT_TEMPLATE_FILE: &str = "chat_template.jinja";

/// The fields of HF `config.json` the Llama family uses.
#[derive(Debug, Clone, Deserialize)]
pub struct HfConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rope_theta: Option<f32>,
    pub rope_scaling: Option<Value>,
    pub rms_norm_eps: Option<f32>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub attention_bias: Option<bool>,
    /// Mistral v0.1 attends only this far back; Qwen2 sets it but switches
    /// it off with `use_sliding_window: false`.
    pub sliding_window: Option<usize>,
    pub use_sliding_window: Option<bool>,
    pub bos_token_id: Option<Value>,
    pub eos_token_id: Option<Value>,
}

fn invalid(path: &Path, why: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        path: path.to_path_buf(),
        why: why.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |cause| ModelError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| invalid(path, e.to_string()))
}

fn read_json_if_present(path: &Path) -> Result<Option<Value>, ModelError> {
    if path.exists() {
        read_json(path).map(Some)
    } else {
        Ok(None)
    }
}

/// Whether `dir` looks like an HF model directory.
pub fn is_hf_dir(dir: &Path) -> bool {
    dir.is_dir() && dir.join(CONFIG_FILE).is_file()
}

fn rope_scaling(path: &Path, v: &Option<Value>) -> Result<Option<Llama3RopeScaling>, ModelError> {
    let Some(v) = v.as_ref().filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("(none given)");
    if kind == "default" {
        return Ok(None);
    }
    if kind != "llama3" {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            what: format!("rope_scaling type \"{kind}\" (only \"llama3\" is)"),
        });
    }
    serde_json::from_value(v.clone())
        .map(Some)
        .map_err(|e| invalid(path, format!("rope_scaling: {e}")))
}

/// `config.json` → [`ModelConfig`].
pub fn config(dir: &Path) -> Result<ModelConfig, ModelError> {
    let path = dir.join(CONFIG_FILE);
    let hf: HfConfig = read_json(&path)?;
    let architecture = match hf.model_type.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(ModelError::UnsupportedArchitecture {
                path,
                architecture: other.to_string(),
            })
        }
    };
    let num_heads = hf.num_attention_heads;
    if num_heads == 0 || (hf.head_dim.is_none() && !hf.hidden_size.is_multiple_of(num_heads)) {
        return Err(invalid(
            &path,
            "num_attention_heads must divide hidden_size",
        ));
    }
    let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
    if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
        return Err(invalid(
            &path,
            "num_key_value_heads must divide num_attention_heads",
        ));
    }
    // The engine attends to the whole sequence; with a sliding window that is
    // the same computation only up to the window's length, so cap the context there.
    let mut max_position_embeddings = hf.max_position_embeddings;
    if let Some(window) = hf
        .sliding_window
        .filter(|_| hf.use_sliding_window != Some(false))
    {
        if window < max_position_embeddings {
            tracing::warn!(
                window,
                max_position_embeddings,
                "sliding-window attention is not implemented; limiting the context to the window"
            );
            max_position_embeddings = window;
        }
    }
    Ok(ModelConfig {
        architecture,
        vocab_size: hf.vocab_size,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads,
        num_kv_heads,
        head_dim: hf.head_dim.unwrap_or(hf.hidden_size / num_heads),
        rope_theta: hf.rope_theta.unwrap_or(10_000.0),
        rope_scaling: rope_scaling(&path, &hf.rope_scaling)?,
        rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
        max_position_embeddings,
        tie_word_embeddings: hf.tie_word_embeddings,
        // HF's Qwen2 always has q/k/v biases; Llama has them iff attention_bias.
        attention_bias: architecture == Architecture::Qwen2 || hf.attention_bias.unwrap_or(false),
    })
}

/// The safetensors files of `dir`: those named by the index, else every
/// `*.safetensors` file.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index = dir.join(INDEX_FILE);
    let files: BTreeSet<PathBuf> = if index.exists() {
        let v: Value = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| invalid(&index, "no weight_map object"))?;
        map.values()
            .map(|f| {
                f.as_str()
                    .map(|f| dir.join(f))
                    .ok_or_else(|| invalid(&index, "weight_map values must be file names"))
            })
            .collect::<Result<_, _>>()?
    } else {
        std::fs::read_dir(dir)
            .map_err(io(dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect()
    };
    if files.is_empty() {
        return Err(invalid(dir, "no *.safetensors files"));
    }
    Ok(files.into_iter().collect())
}

/// Memory maps of every shard of a directory, and which shard holds each tensor.
struct Shards {
    dir: PathBuf,
    maps: Vec<(PathBuf, Mmap)>,
    /// tensor name → index into `maps`.
    index: BTreeMap<String, usize>,
}

impl Shards {
    fn open(dir: &Path) -> Result<Self, ModelError> {
        let mut maps = Vec::new();
        let mut index = BTreeMap::new();
        for path in safetensors_files(dir)? {
            let file = File::open(&path).map_err(io(&path))?;
            // SAFETY: read-only map of a file not modified while loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
            let (_, meta) =
                SafeTensors::read_metadata(&mmap).map_err(|e| invalid(&path, e.to_string()))?;
            for name in meta.tensors().keys() {
                index.insert(name.clone(), maps.len());
            }
            maps.push((path, mmap));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            maps,
            index,
        })
    }

    fn shard_of(&self, name: &str) -> Result<usize, ModelError> {
        self.index
            .get(name)
            .copied()
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            })
    }
}

impl TensorSource for Shards {
    const NAMES: &'static Names = &NAMES;

    fn check(&self, name: &str) -> Result<(), ModelError> {
        self.shard_of(name).map(|_| ())
    }

    fn load(&self, _id: WeightId, name: &str, shape: &[usize]) -> Result<Tensor, ModelError> {
        let i = self.shard_of(name)?;
        let (path, mmap) = &self.maps[i];
        let st = SafeTensors::deserialize(mmap).map_err(|e| invalid(path, e.to_string()))?;
        let view = st.tensor(name).map_err(|e| invalid(path, e.to_string()))?;
        if view.shape() != shape {
            return Err(ModelError::TensorShape {
                path: path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(ModelError::UnsupportedTensorType {
                    path: path.clone(),
                    name: name.to_string(),
                    ggml_type: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor::new(shape.to_vec(), data))
    }
}

/// What Hugging Face checkpoints call each tensor.
pub const NAMES: Names = Names {
    embed: "model.embed_tokens.weight",
    final_norm: "model.norm.weight",
    output: "lm_head.weight",
    layer_prefix: "model.layers.",
    layer: [
        "input_layernorm.weight",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.q_proj.bias",
        "self_attn.k_proj.bias",
        "self_attn.v_proj.bias",
        "self_attn.o_proj.weight",
        "post_attention_layernorm.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
    ],
};

/// The HF names of every tensor [`weights`] reads.
pub fn expected_tensor_names(cfg: &ModelConfig) -> Vec<String> {
    NAMES.all(cfg)
}

/// Every weight, converted to f32. `on_tensor` is called once per tensor.
pub fn weights(
    dir: &Path,
    cfg: &ModelConfig,
    on_tensor: &(dyn Fn() + Sync),
) -> Result<Weights, ModelError> {
    assemble::assemble(cfg, &Shards::open(dir)?, on_tensor)
}

/// Parameter count, total bytes and a storage label ("BF16", "mixed F32+BF16")
/// from the safetensors headers alone.
pub fn tensor_summary(dir: &Path) -> Result<(usize, u64, String), ModelError> {
    let mut params = 0usize;
    let mut bytes = 0u64;
    let mut by_dtype: BTreeMap<String, usize> = BTreeMap::new();
    for path in safetensors_files(dir)? {
        let file = File::open(&path).map_err(io(&path))?;
        bytes += file.metadata().map_err(io(&path))?.len();
        // SAFETY: read-only map; only the header pages are touched.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io(&path))?;
        let (_, meta) =
            SafeTensors::read_metadata(&mmap).map_err(|e| invalid(&path, e.to_string()))?;
        for info in meta.tensors().values() {
            let n: usize = info.shape.iter().product();
            params += n;
            if info.shape.len() >= 2 {
                *by_dtype.entry(format!("{:?}", info.dtype)).or_default() += n;
            }
        }
    }
    Ok((params, bytes, super::gguf_model::mixed_label(by_dtype)))
}

/// A special token given as `"<s>"` or `{"content": "<s>", ...}`.
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Token ids given as `2` or `[2, 32000]`.
fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_u64)
            .map(|n| n as u32)
            .collect(),
        _ => Vec::new(),
    }
}

/// The tokenizer and the chat template cause of an HF directory.
pub fn tokenizer_and_template(dir: &Path) -> Result<(Tokenizer, Option<String>), ModelError> {
    let tok_path = dir.join(TOKENIZER_FILE);
    if !tok_path.is_file() {
        return Err(invalid(
            dir,
            "no tokenizer.json (only HF fast tokenizers are supported)",
        ));
    }
    let inner = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| invalid(&tok_path, e.to_string()))?;
    let tok_cfg = read_json_if_present(&dir.join(TOKENIZER_CONFIG_FILE))?.unwrap_or(Value::Null);
    let gen_cfg = read_json_if_present(&dir.join(GENERATION_CONFIG_FILE))?.unwrap_or(Value::Null);
    let model_cfg: Value = read_json(&dir.join(CONFIG_FILE))?;

    let id_of = |content: Option<String>| content.and_then(|c| inner.token_to_id(&c));
    let bos_token_id = id_of(token_content(tok_cfg.get("bos_token")))
        .or_else(|| token_ids(gen_cfg.get("bos_token_id")).first().copied())
        .or_else(|| token_ids(model_cfg.get("bos_token_id")).first().copied());
    let mut eos_token_ids: Vec<u32> = id_of(token_content(tok_cfg.get("eos_token")))
        .into_iter()
        .collect();
    // generation_config.json lists every id that ends a turn (Llama 3: several).
    let extra = match token_ids(gen_cfg.get("eos_token_id")) {
        ids if !ids.is_empty() => ids,
        _ => token_ids(model_cfg.get("eos_token_id")),
    };
    for id in extra {
        if !eos_token_ids.contains(&id) {
            eos_token_ids.push(id);
        }
    }
    // Absent the flag, BOS is added iff the tokenizer's own post-processor
    // would add it (Llama 3 ships it that way).
    let add_bos_token = match tok_cfg.get("add_bos_token").and_then(Value::as_bool) {
        Some(flag) => flag,
        None => match bos_token_id {
            Some(bos) => inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&bos))
                .unwrap_or(false),
            None => false,
        },
    };
    let template = match tok_cfg.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(named)) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| named.first())
            .and_then(|t| t.get("template"))
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    };
    let template = match template {
        Some(t) => Some(t),
        None => {
            let p = dir.join(CHAT_TEMPLATE_FILE);
            if p.is_file() {
                Some(std::fs::read_to_string(&p).map_err(io(&p))?)
            } else {
                None
            }
        }
    };
    Ok((
        Tokenizer::new(inner, bos_token_id, eos_token_ids, add_bos_token),
        template,
    ))
}
