//! Flags and start-up steps every process role shares: `serve`, `prefill`,
//! `decode` (and, for the HTTP side, `frontend`).
//!
//! Every role binds its HTTP port before the slow part (loading weights) so
//! orchestrators see `/health` = 503 instead of "connection refused", and every
//! role drains on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

use crate::engine::backend::{self, CudaOptions, DeviceArgs, LoadFormat, WeightsSource};
use crate::engine::{Engine, EngineConfig, EngineHandle};
use crate::model::{self, ChatTemplate, ModelInfo, Tokenizer};
use crate::server::{self, ServerConfig};

/// `--kv-cache-memory` when not given: the engine's default budget.
pub const DEFAULT_KV_CACHE_MEMORY: &str = "512MiB";

/// The alias every server accepts as `model`, so clients that do not care
/// which model they talk to need not look the name up first.
pub const DEFAULT_MODEL_ALIAS: &str = "default";

/// Which model a process serves and where its HTTP side listens.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelHttpArgs {
    /// Model to serve: a cached name (see `tandem model list`), a `.gguf` file
    /// or a Hugging Face directory. Omitted: the default model
    /// (SmolLM2-135M-Instruct), fetched into the cache if missing.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,

    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// HTTP port (0 picks a free one; the log says which).
    #[arg(long, env = "TANDEM_PORT", default_value_t = 8000)]
    pub port: u16,

    /// Names clients may pass as `model`, comma-separated; the first is the one
    /// `/v1/models` lists and responses carry. Default: the model's own name;
    /// `default` is always accepted too.
    #[arg(long, env = "TANDEM_SERVED_MODEL_NAME", value_delimiter = ',')]
    pub served_model_name: Vec<String>,

    /// Longest sequence (prompt + generated tokens) a request may use.
    /// Default: the model's context length; larger is refused.
    #[arg(long, env = "TANDEM_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,

    /// Seconds in-flight requests may run after SIGTERM/SIGINT before the
    /// process exits anyway.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

impl ModelHttpArgs {
    pub fn listen_address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The served name and its aliases (`default` always among them).
    pub fn server_config(&self, model_name: &str, default_max_tokens: usize) -> ServerConfig {
        let mut names: Vec<String> = self
            .served_model_name
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect();
        if names.is_empty() {
            names.push(model_name.to_string());
        }
        let mut config = ServerConfig::new(names.remove(0));
        if !names.iter().any(|n| n == DEFAULT_MODEL_ALIAS)
            && config.model_name != DEFAULT_MODEL_ALIAS
        {
            names.push(DEFAULT_MODEL_ALIAS.to_string());
        }
        config.model_aliases = names;
        config.default_max_tokens = default_max_tokens;
        config.shutdown_grace = Duration::from_secs(self.shutdown_grace_secs);
        config
    }
}

/// The model file and its metadata, and the context length this process serves.
pub struct ResolvedModel {
    pub path: PathBuf,
    pub info: ModelInfo,
    pub max_model_len: usize,
}

/// Finds the model (fetching the default if needed) and reads its metadata:
/// fast, no weights loaded.
pub fn resolve_model(args: &ModelHttpArgs) -> anyhow::Result<ResolvedModel> {
    let path = model::resolve(args.model.as_deref())?;
    let info = model::inspect(&path)?;
    let max_model_len = match args.max_model_len {
        Some(n) if n > info.context_length => anyhow::bail!(
            "--max-model-len {n} exceeds the model's context length of {} tokens",
            info.context_length
        ),
        Some(0) => anyhow::bail!("--max-model-len must be at least 1"),
        Some(n) => n,
        None => info.context_length,
    };
    Ok(ResolvedModel {
        path,
        info,
        max_model_len,
    })
}

/// How the engine batches and how much KV cache it keeps.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// Memory for the KV cache, e.g. `512MiB`, `2GiB` or a byte count; the
    /// number of blocks follows from the model's KV bytes per token.
    #[arg(long, env = "TANDEM_KV_CACHE_MEMORY", value_parser = parse_byte_size, default_value = DEFAULT_KV_CACHE_MEMORY, conflicts_with = "num_blocks")]
    pub kv_cache_memory: u64,

    /// Number of KV cache blocks, instead of `--kv-cache-memory`.
    #[arg(long, env = "TANDEM_NUM_BLOCKS")]
    pub num_blocks: Option<usize>,

    /// Tokens per KV cache block (prefix caching works on whole blocks).
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = EngineConfig::default().block_size)]
    pub block_size: usize,

    /// Most sequences in the running batch at once.
    #[arg(long, env = "TANDEM_MAX_NUM_SEQS", default_value_t = EngineConfig::default().max_num_seqs)]
    pub max_num_seqs: usize,

    /// Token budget of one engine step (prompt chunks plus decodes).
    #[arg(long, env = "TANDEM_MAX_BATCH_TOKENS", default_value_t = EngineConfig::default().max_batch_tokens)]
    pub max_batch_tokens: usize,

    /// Requests that may wait for admission; beyond it new requests are refused
    /// (429 from the OpenAI API, RESOURCE_EXHAUSTED over gRPC).
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = EngineConfig::default().max_queue)]
    pub max_queue: usize,

    /// Compute threads; 0 uses one per core.
    #[arg(long, env = "TANDEM_THREADS", default_value_t = EngineConfig::default().threads)]
    pub threads: usize,

    #[command(flatten)]
    pub device: DeviceArgs,
}

impl EngineArgs {
    pub fn engine_config(&self) -> anyhow::Result<EngineConfig> {
        Ok(EngineConfig {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            kv_cache_bytes: usize::try_from(self.kv_cache_memory)
                .context("--kv-cache-memory does not fit in memory")?,
            max_batch_tokens: self.max_batch_tokens,
            max_num_seqs: self.max_num_seqs,
            max_queue: self.max_queue,
            threads: self.threads,
        })
    }
}

/// A started engine and the text side of its model.
pub struct LoadedEngine {
    pub engine: EngineHandle,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
}

/// Loads the weights and starts the engine: the slow part; call it off the
/// async threads. `role` labels the worker metrics.
pub fn load_engine(
    path: &Path,
    args: &EngineArgs,
    max_model_len: usize,
    role: &'static str,
) -> anyhow::Result<LoadedEngine> {
    let started = std::time::Instant::now();
    let device = &args.device;
    if device.load_format == LoadFormat::Auto && device.dummy_shape.is_some() {
        anyhow::bail!("--dummy-shape needs --load-format dummy");
    }
    backend::preflight(&device.device, device.tensor_parallel_size)?;
    // Dummy weights need only the file's text side (tokenizer, chat template,
    // shape): no weight is read, so a tokenizer-only GGUF serves too.
    let (config, host_weights, tokenizer, chat_template) = match device.load_format {
        LoadFormat::Auto => {
            let loaded = model::load(path)?;
            (
                loaded.config,
                Some(loaded.weights),
                loaded.tokenizer,
                loaded.chat_template,
            )
        }
        LoadFormat::Dummy => {
            let text = model::load_text(path)?;
            let shape = match &device.dummy_shape {
                Some(name) => model::dummy::config(name)?,
                None => text.info.config,
            };
            (shape, None, text.tokenizer, text.chat_template)
        }
    };
    let source = match &host_weights {
        Some(weights) => WeightsSource::Host(weights),
        None => WeightsSource::Dummy { seed: 0 },
    };
    anyhow::ensure!(
        tokenizer.vocab_size() <= config.vocab_size,
        "the tokenizer has {} tokens but the dummy shape's vocabulary only {}",
        tokenizer.vocab_size(),
        config.vocab_size
    );
    let cuda_options = CudaOptions {
        max_batch_tokens: args.max_batch_tokens,
        max_num_seqs: args.max_num_seqs,
        max_model_len,
        gpu_memory_utilization: device.gpu_memory_utilization,
        cuda_graphs: true,
        tensor_parallel_size: device.tensor_parallel_size,
    };
    let backend = backend::create(&device.device, config, source, &cuda_options)?;
    // The backend keeps its own (compact or device) copy; the f32 weights go now.
    drop(host_weights);
    let mut engine_config = args.engine_config()?;
    // A GPU's KV pool gets what --gpu-memory-utilization leaves, unless the
    // block count is given.
    if let (None, Some(budget)) = (engine_config.num_blocks, backend.kv_cache_budget_bytes()) {
        engine_config.kv_cache_bytes = budget;
    }
    let engine = Engine::start(
        backend,
        engine_config,
        tokenizer.eos_token_ids().to_vec(),
        max_model_len,
        role,
    )?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        role,
        "model loaded and engine started"
    );
    Ok(LoadedEngine {
        engine,
        tokenizer,
        chat_template,
    })
}

/// A multi-threaded Tokio runtime for a role's network side; compute runs on
/// the engine's own threads.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for SIGINT: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

/// Default for `--default-max-tokens`, re-exported for the flag definitions.
pub const DEFAULT_MAX_TOKENS: usize = server::DEFAULT_MAX_TOKENS;

/// `512MiB`, `2GiB`, `1.5G`, `1000000` → bytes. Binary and decimal suffixes
/// are both accepted (`K`/`KB` = 1000, `Ki`/`KiB` = 1024), case-insensitive.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 512MiB, 2GiB or 1000000"))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "ki" | "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mi" | "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gi" | "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "ti" | "tib" => 1 << 40,
        other => return Err(format!("unknown size unit `{other}` in `{text}`")),
    };
    let bytes = value * multiplier as f64;
    if bytes < 1.0 {
        return Err(format!("`{text}` is less than one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_byte_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_byte_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_byte_size("1.5G"), Ok(1_500_000_000));
        assert_eq!(parse_byte_size("4096"), Ok(4096));
        assert_eq!(parse_byte_size(" 64 kib "), Ok(64 << 10));
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("5 parsecs").is_err());
        assert!(parse_byte_size("0").is_err());
    }
}
