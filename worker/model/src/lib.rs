//! Model files: configuration, weights, tokenizer and chat template, from GGUF
//! files or Hugging Face directories, plus the model cache and default-model fetch.
//!
//! Callers use [`resolve`] (a user's `--model` to a path), [`inspect`] (metadata
//! only) and [`load`] (everything, weights as f32 in HF layout).

pub mod assemble;
pub mod chat;
pub mod config;
pub mod dummy;
pub mod fetch;
pub mod gguf;
pub mod gguf_model;
pub mod hf;
pub mod hub;
pub mod hub_cache;
pub mod quant;
pub mod testing;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};
use std::time::Instant;

pub use chat::{ChatFunctionCall, ChatMessage, ChatTemplate, ChatToolCall};
pub use config::{Architecture, ModelConfig};
pub use tokenizer::{IncrementalDecoder, Tokenizer};
pub use weights::{LayerWeights, Tensor, Weights};

use chat::ChatTemplateError;
use fetch::FetchError;
use gguf::{GgufError, GgufFile};
use hub::HubError;
use tokenizer::TokenizerError;

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("{path}: architecture \"{architecture}\" is not supported (supported: llama, mistral, qwen2)")]
    UnsupportedArchitecture { path: PathBuf, architecture: String },
    #[error("{path}: {what} is not supported")]
    Unsupported { path: PathBuf, what: String },
    #[error("{path}: metadata key {key} is missing")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: metadata key {key}: {why}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        why: String,
    },
    #[error("{path}: tensor {name} is missing")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor {name} has type {ggml_type}, which is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)")]
    UnsupportedTensorType {
        path: PathBuf,
        name: String,
        ggml_type: String,
    },
    #[error("{path}: tensor {name} has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: {cause}")]
    Tokenizer {
        path: PathBuf,
        cause: TokenizerError,
    },
    #[error("{path}: {cause}")]
    ChatTemplate {
        path: PathBuf,
        cause: ChatTemplateError,
    },
    #[error("no model \"{spec}\": not a file, not a directory, and not a cached model name.\n  cached models (in {cache} and the Hugging Face cache {hub_cache}): {cached}\n  --model accepts a cached model name (e.g. {DEFAULT_MODEL}), a path to a .gguf file, a Hugging Face model directory (with config.json), or a Hub repository ORG/REPO[@REVISION] (downloaded into the Hugging Face cache on first use)")]
    NotFound {
        spec: String,
        cache: PathBuf,
        hub_cache: PathBuf,
        cached: String,
    },
}

/// A model ready for a backend.
pub struct LoadedModel {
    pub name: String,
    pub path: PathBuf,
    pub config: ModelConfig,
    pub weights: Weights,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub info: ModelInfo,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("name", &self.name)
            .field("path", &self.path)
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

/// What a model is, read from metadata without loading weights.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// "gguf" or "safetensors".
    pub format: String,
    pub architecture: String,
    pub parameters: usize,
    /// How weights are stored: "Q4_1", "F16", "BF16", "mixed Q8_0+F32", ...
    pub quantization: String,
    pub context_length: usize,
    pub has_chat_template: bool,
    /// Size of the model's weight files on disk.
    pub file_bytes: u64,
    pub config: ModelConfig,
}

/// Where models are cached: `TANDEM_MODEL_DIR`, else `~/.cache/tandem/models`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TANDEM_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".cache/tandem/models")
}

/// A model found in the cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedModel {
    pub name: String,
    pub path: PathBuf,
}

/// The model name of a file or directory: `SmolLM2-135M-Instruct.Q4_1.gguf`
/// → `SmolLM2-135M-Instruct` (a trailing quantization label is dropped); a
/// snapshot of the Hugging Face cache (`models--ORG--REPO/snapshots/<commit>`)
/// → `ORG/REPO`, the name it was asked for by.
pub fn model_name(path: &Path) -> String {
    if let Some(repo) = hub_snapshot_repo(path) {
        return repo;
    }
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    let Some(stem) = file.strip_suffix(".gguf") else {
        return file;
    };
    match stem.rsplit_once('.') {
        Some((base, label)) if looks_like_quant_label(label) => base.to_string(),
        _ => stem.to_string(),
    }
}

fn hub_snapshot_repo(path: &Path) -> Option<String> {
    let snapshots = path.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    hub_cache::repo_of_dir_name(&snapshots.parent()?.file_name()?.to_string_lossy())
}

fn looks_like_quant_label(s: &str) -> bool {
    let s = s.to_ascii_uppercase();
    ["Q", "IQ", "F", "BF", "TQ"].iter().any(|p| {
        s.strip_prefix(p)
            .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    })
}

/// Models in the caches: `*.gguf` files and HF directories in Tandem's, and
/// the repositories of the Hugging Face cache whose snapshot Tandem can load
/// (named `ORG/REPO`, or `ORG/REPO@REF` for refs other than `main`).
pub fn cached_models() -> Vec<CachedModel> {
    let mut models = tandem_cached_models();
    models.extend(
        hub_cache::HubCache::from_env()
            .models()
            .into_iter()
            .map(|(name, path)| CachedModel { name, path }),
    );
    models.sort_by(|a, b| a.name.cmp(&b.name));
    models
}

fn tandem_cached_models() -> Vec<CachedModel> {
    let Ok(entries) = std::fs::read_dir(cache_dir()) else {
        return Vec::new();
    };
    let mut models: Vec<CachedModel> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let hidden = p
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with('.'));
            !hidden
                && ((p.is_file() && p.extension().is_some_and(|e| e == "gguf")) || hf::is_hf_dir(p))
        })
        .map(|path| CachedModel {
            name: model_name(&path),
            path,
        })
        .collect();
    models.sort_by(|a, b| a.name.cmp(&b.name));
    models
}

/// Turns a user's model spec into a path. `None` means the default model,
/// fetched into the cache if missing. Otherwise: an existing path (a GGUF file
/// or an HF directory), a cached model's name (case-insensitive, with or
/// without its file suffix), or a Hub repository (`ORG/REPO[@REVISION]` or
/// `hf://…`), taken from the Hugging Face cache and downloaded into it first
/// when it is not there ([`hub::resolve`]; `HF_HUB_OFFLINE` forbids that).
pub fn resolve(spec: Option<&str>) -> Result<PathBuf, ModelError> {
    let spec = match spec {
        None => {
            return Ok(fetch::fetch_default(&cache_dir(), &fetch::python())?
                .path()
                .to_path_buf())
        }
        Some(s) => s,
    };
    let as_path = Path::new(spec);
    if as_path.is_file() {
        return Ok(as_path.to_path_buf());
    }
    if as_path.is_dir() {
        if hf::is_hf_dir(as_path) {
            return Ok(as_path.to_path_buf());
        }
        return Err(ModelError::Invalid {
            path: as_path.to_path_buf(),
            why: "a directory without config.json is not a Hugging Face model directory"
                .to_string(),
        });
    }
    if spec.starts_with(hub::SCHEME) {
        return resolve_hub(spec);
    }
    let cached = cached_models();
    let wanted = spec.to_lowercase();
    let matches = |m: &CachedModel| {
        let file = m
            .path
            .file_name()
            .map(|f| f.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        m.name.to_lowercase() == wanted
            || file == wanted
            || file.strip_suffix(".gguf") == Some(wanted.as_str())
    };
    if let Some(m) = cached.iter().find(|m| matches(m)) {
        return Ok(m.path.clone());
    }
    if wanted == DEFAULT_MODEL.to_lowercase()
        || wanted == fetch::DEFAULT_FILE.to_lowercase()
        || Some(wanted.as_str()) == fetch::DEFAULT_FILE.to_lowercase().strip_suffix(".gguf")
    {
        return Ok(fetch::fetch_default(&cache_dir(), &fetch::python())?
            .path()
            .to_path_buf());
    }
    if hub::HubRepo::parse_model_arg(spec)?.is_some() {
        return resolve_hub(spec);
    }
    Err(ModelError::NotFound {
        spec: spec.to_string(),
        cache: cache_dir(),
        hub_cache: hub_cache::HubCache::from_env().root().to_path_buf(),
        cached: if cached.is_empty() {
            "(none)".to_string()
        } else {
            cached
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        },
    })
}

fn resolve_hub(spec: &str) -> Result<PathBuf, ModelError> {
    let repo =
        hub::HubRepo::parse_model_arg(spec)?.ok_or_else(|| HubError::BadSpec(spec.to_string()))?;
    Ok(hub::resolve(
        &repo,
        &hub_cache::HubCache::from_env(),
        hub_cache::offline_from_env(),
        hub::HubClient::from_env,
    )?)
}

/// Directories are HF models; any file is read as GGUF and its magic bytes
/// decide whether it is one.
fn is_gguf(path: &Path) -> bool {
    !path.is_dir()
}

/// Reads what a model is from its metadata (GGUF header or HF config and
/// safetensors headers) without decoding weights.
pub fn inspect(path: &Path) -> Result<ModelInfo, ModelError> {
    if is_gguf(path) {
        let f = GgufFile::open(path)?;
        let config = gguf_model::config(&f)?;
        let file_bytes = std::fs::metadata(path)
            .map_err(|cause| ModelError::Io {
                path: path.to_path_buf(),
                cause,
            })?
            .len();
        Ok(ModelInfo {
            name: model_name(path),
            format: "gguf".to_string(),
            architecture: config.architecture.to_string(),
            // RoPE factors are derived data, not parameters.
            parameters: f
                .tensors
                .iter()
                .filter(|t| t.name != gguf_model::ROPE_FREQS)
                .map(|t| t.numel())
                .sum(),
            quantization: gguf_model::quantization_label(&f),
            context_length: config.max_position_embeddings,
            has_chat_template: gguf_model::chat_template_source(&f).is_some(),
            file_bytes,
            config,
        })
    } else {
        let config = hf::config(path)?;
        let (parameters, file_bytes, quantization) = hf::tensor_summary(path)?;
        let (_, template) = hf::tokenizer_and_template(path)?;
        Ok(ModelInfo {
            name: model_name(path),
            format: "safetensors".to_string(),
            architecture: config.architecture.to_string(),
            parameters,
            quantization,
            context_length: config.max_position_embeddings,
            has_chat_template: template.is_some(),
            file_bytes,
            config,
        })
    }
}

fn progress_bar(len: usize, name: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} tensors")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(name.to_string());
    bar
}

/// Compiles a chat template source for `tokenizer`'s special tokens; `path`
/// (the model, or a `--chat-template` file) names it in errors.
pub fn compile_template(
    path: &Path,
    template: Option<String>,
    tokenizer: &Tokenizer,
) -> Result<Option<ChatTemplate>, ModelError> {
    let Some(template) = template else {
        return Ok(None);
    };
    let token = |id: Option<u32>| {
        id.and_then(|i| tokenizer.id_to_token(i))
            .unwrap_or_default()
    };
    let bos = token(tokenizer.bos_token_id());
    let eos = token(tokenizer.eos_token_ids().first().copied());
    ChatTemplate::new(template, bos, eos)
        .map(Some)
        .map_err(|cause| ModelError::ChatTemplate {
            path: path.to_path_buf(),
            cause,
        })
}

/// Reads a chat template file (`--chat-template`) and checks that it compiles,
/// before any model is loaded, so a broken file stops start-up at once with its
/// name. The source is compiled again with the model's special tokens by
/// [`compile_template`] once the tokenizer is known.
pub fn read_chat_template(file: &Path) -> Result<String, ModelError> {
    let source = std::fs::read_to_string(file).map_err(|cause| ModelError::Io {
        path: file.to_path_buf(),
        cause,
    })?;
    if source.trim().is_empty() {
        return Err(ModelError::Invalid {
            path: file.to_path_buf(),
            why: "the chat template file is empty".to_string(),
        });
    }
    ChatTemplate::new(source.as_str(), "", "").map_err(|cause| ModelError::ChatTemplate {
        path: file.to_path_buf(),
        cause,
    })?;
    Ok(source)
}

/// Loads a GGUF file or HF directory: config, f32 weights in HF layout,
/// tokenizer, chat template. Shows a progress bar on stderr when it is a terminal.
pub fn load(path: &Path) -> Result<LoadedModel, ModelError> {
    let started = Instant::now();
    let info = inspect(path)?;
    let config = info.config.clone();
    let tensors = assemble::weight_ids(&config).len();
    let (weights, tokenizer, template) = if is_gguf(path) {
        let f = GgufFile::open(path)?;
        let tokenizer = gguf_model::tokenizer(&f)?;
        let bar = progress_bar(tensors, &info.name);
        let weights = gguf_model::weights(&f, &config, &|| bar.inc(1))?;
        bar.finish_and_clear();
        (weights, tokenizer, gguf_model::chat_template_source(&f))
    } else {
        let (tokenizer, template) = hf::tokenizer_and_template(path)?;
        let bar = progress_bar(tensors, &info.name);
        let weights = hf::weights(path, &config, &|| bar.inc(1))?;
        bar.finish_and_clear();
        (weights, tokenizer, template)
    };
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::Invalid {
            path: path.to_path_buf(),
            why: format!(
                "the tokenizer has {} tokens but the model's embedding only {}",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        });
    }
    let chat_template = compile_template(path, template, &tokenizer)?;
    tracing::info!(
        model = %info.name,
        format = %info.format,
        quantization = %info.quantization,
        parameters = info.parameters,
        seconds = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    Ok(LoadedModel {
        name: info.name.clone(),
        path: path.to_path_buf(),
        config,
        weights,
        tokenizer,
        chat_template,
        info,
    })
}

/// The text side of a model: what a frontend needs (tokenizer, chat template)
/// without loading any weights.
pub struct ModelText {
    pub info: ModelInfo,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

/// Reads only a model's metadata, tokenizer and chat template: milliseconds
/// instead of a weight load, for `tandem frontend`.
pub fn load_text(path: &Path) -> Result<ModelText, ModelError> {
    let info = inspect(path)?;
    let (tokenizer, template) = if is_gguf(path) {
        let f = GgufFile::open(path)?;
        (
            gguf_model::tokenizer(&f)?,
            gguf_model::chat_template_source(&f),
        )
    } else {
        hf::tokenizer_and_template(path)?
    };
    let chat_template = compile_template(path, template, &tokenizer)?;
    Ok(ModelText {
        info,
        tokenizer,
        chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_drop_quantization_labels() {
        assert_eq!(
            model_name(Path::new("/c/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "SmolLM2-135M-Instruct"
        );
        assert_eq!(
            model_name(Path::new("llama-3.2-1b.BF16.gguf")),
            "llama-3.2-1b"
        );
        assert_eq!(model_name(Path::new("tiny.gguf")), "tiny");
        assert_eq!(model_name(Path::new("v0.5.gguf")), "v0.5");
        assert_eq!(model_name(Path::new("/m/Qwen2-0.5B")), "Qwen2-0.5B");
    }
}
