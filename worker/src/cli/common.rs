//! Flags and start-up steps every process role shares: `serve`, `prefill`,
//! `decode` (and, for the HTTP side, `frontend`).
//!
//! Every role binds its HTTP port before the slow part (loading weights) so
//! orchestrators see `/health` = 503 instead of "connection refused", and every
//! role drains on SIGTERM/SIGINT.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

pub use tandem_api::args::{
    parse_byte_size, EngineArgs, ModelHttpArgs, DEFAULT_MAX_TOKENS, DEFAULT_MODEL_ALIAS,
};
use tandem_engine::backend::{self, CudaOptions, LoadFormat, WeightsSource};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::{self as model, ChatTemplate, ModelInfo, Tokenizer};

use tandem_server::ServerConfig;

/// The name clients see: the first `--served-model-name`, else the model's own.
pub fn served_name(args: &ModelHttpArgs, model_name: &str) -> String {
    args.served_model_name
        .iter()
        .map(|n| n.trim())
        .find(|n| !n.is_empty())
        .unwrap_or(model_name)
        .to_string()
}

/// How this process's `/metrics` renders: every series labelled with the served name, and
/// the peers' names asked for with `--metrics-compat`.
pub fn configure_metrics(args: &ModelHttpArgs, model_name: &str) {
    tandem_api::metrics::metrics().set_exposition(tandem_api::metrics::Exposition {
        model: Some(served_name(args, model_name)),
        compat: args.metrics_compat.clone(),
    });
}

/// The served name and its aliases (`default` always among them).
pub fn server_config(
    args: &ModelHttpArgs,
    model_name: &str,
    default_max_tokens: usize,
) -> ServerConfig {
    let mut names: Vec<String> = args
        .served_model_name
        .iter()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    if names.is_empty() {
        names.push(model_name.to_string());
    }
    let mut config = ServerConfig::new(names.remove(0));
    if !names.iter().any(|n| n == DEFAULT_MODEL_ALIAS) && config.model_name != DEFAULT_MODEL_ALIAS {
        names.push(DEFAULT_MODEL_ALIAS.to_string());
    }
    config.model_aliases = names;
    config.default_max_tokens = default_max_tokens;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config
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

/// `--chat-template FILE`: read and checked at start-up, before anything slow,
/// and compiled with the model's special tokens once its tokenizer is loaded.
pub struct ChatTemplateFile {
    path: PathBuf,
    source: String,
}

impl ChatTemplateFile {
    /// `None` without the flag; an error naming the file when it cannot be read
    /// or does not compile.
    pub fn read(path: Option<&Path>) -> anyhow::Result<Option<Self>> {
        let Some(path) = path else {
            return Ok(None);
        };
        let source = model::read_chat_template(path).context("--chat-template")?;
        Ok(Some(Self {
            path: path.to_path_buf(),
            source,
        }))
    }

    /// The template that replaces the model's own.
    pub fn compile(&self, tokenizer: &Tokenizer) -> anyhow::Result<ChatTemplate> {
        let template = model::compile_template(&self.path, Some(self.source.clone()), tokenizer)?
            .expect("a source was given");
        tracing::info!(file = %self.path.display(), "chat template from --chat-template replaces the model's");
        Ok(template)
    }
}

/// The engine's batching and KV cache settings from its flags.
pub fn engine_config(args: &EngineArgs) -> anyhow::Result<EngineConfig> {
    Ok(EngineConfig {
        block_size: args.block_size,
        num_blocks: args.num_blocks,
        kv_cache_bytes: usize::try_from(args.kv_cache_memory)
            .context("--kv-cache-memory does not fit in memory")?,
        max_batch_tokens: args.max_batch_tokens,
        max_num_seqs: args.max_num_seqs,
        max_queue: args.max_queue,
        threads: args.threads,
    })
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
    let mut engine_config = engine_config(args)?;
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
    )?
    .with_guide(tandem_guide::Guide::new(tokenizer.clone()));
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
