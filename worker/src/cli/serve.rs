//! `tandem serve`: the aggregated server, the OpenAI API and the engine in one
//! process.
//!
//! Order matters for orchestration: the model file is resolved and inspected
//! (fast, metadata only) so the served name is known, then the port is bound
//! and `/health` answers 503 while the weights load and the engine starts,
//! then 200. SIGTERM or SIGINT drains: new requests get 503, admitted ones
//! finish within `--shutdown-grace-secs`, and the process exits 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::engine::backend::{CpuBackend, WeightStorage};
use crate::engine::{Engine, EngineConfig};
use crate::model;
use crate::server::{self, AppState, ServedModel, ServerConfig};

/// `--kv-cache-memory` when not given: the engine's default budget.
const DEFAULT_KV_CACHE_MEMORY: &str = "512MiB";

/// The alias every server accepts as `model`, so clients that do not care
/// which model they talk to need not look the name up first.
pub const DEFAULT_MODEL_ALIAS: &str = "default";

/// The `role` label of this process's worker metrics.
const ROLE: &str = "aggregated";

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Model to serve: a cached name (see `tandem model list`), a `.gguf` file
    /// or a Hugging Face directory. Omitted: the default model
    /// (SmolLM2-135M-Instruct), fetched into the cache if missing.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<String>,

    /// Address to listen on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free one; the log says which).
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

    /// Requests that may wait for admission; beyond it new requests get 429.
    #[arg(long, env = "TANDEM_MAX_QUEUE", default_value_t = EngineConfig::default().max_queue)]
    pub max_queue: usize,

    /// Compute threads; 0 uses one per core.
    #[arg(long, env = "TANDEM_THREADS", default_value_t = EngineConfig::default().threads)]
    pub threads: usize,

    /// Tokens generated when a request gives no `max_tokens` (never more than
    /// the room left in the context).
    #[arg(long, env = "TANDEM_DEFAULT_MAX_TOKENS", default_value_t = server::DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: usize,

    /// Seconds in-flight requests may run after SIGTERM/SIGINT before the
    /// process exits anyway.
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE_SECS", default_value_t = 30)]
    pub shutdown_grace_secs: u64,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // The HTTP side is light; compute runs on the engine's own threads.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
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
    let config = server_config(&args, &info.name);

    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        address = %local,
        model = %config.model_name,
        path = %path.display(),
        "listening; loading the model (/health answers 503 until ready)"
    );

    let state = AppState::new(config);
    let mut server = tokio::spawn(server::serve(listener, state.clone(), shutdown_signal()));

    let loading = tokio::task::spawn_blocking({
        let args = args.clone();
        move || load(&path, &args, max_model_len)
    });
    tokio::select! {
        loaded = loading => {
            let served = loaded.context("model loading panicked")??;
            state.set_model(served);
            tracing::info!(address = %local, max_model_len, "ready");
        }
        finished = &mut server => {
            // A signal arrived while loading: nothing is in flight.
            finished.context("server task panicked")??;
            tracing::info!("stopped before the model finished loading");
            return Ok(());
        }
    }
    server.await.context("server task panicked")??;
    tracing::info!("shut down");
    Ok(())
}

fn server_config(args: &ServeArgs, model_name: &str) -> ServerConfig {
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
    config.default_max_tokens = args.default_max_tokens;
    config.shutdown_grace = Duration::from_secs(args.shutdown_grace_secs);
    config
}

/// Load the weights and start the engine: the slow part, run off the async threads.
fn load(path: &Path, args: &ServeArgs, max_model_len: usize) -> anyhow::Result<ServedModel> {
    let started = std::time::Instant::now();
    let model::LoadedModel {
        config,
        weights,
        tokenizer,
        chat_template,
        ..
    } = model::load(path)?;
    let backend = CpuBackend::new(config, &weights, WeightStorage::default())?;
    // The backend keeps its own (compact) copy; the f32 weights go now.
    drop(weights);
    let engine_config = EngineConfig {
        block_size: args.block_size,
        num_blocks: args.num_blocks,
        kv_cache_bytes: usize::try_from(args.kv_cache_memory)
            .context("--kv-cache-memory does not fit in memory")?,
        max_batch_tokens: args.max_batch_tokens,
        max_num_seqs: args.max_num_seqs,
        max_queue: args.max_queue,
        threads: args.threads,
    };
    let engine = Engine::start(
        Box::new(backend),
        engine_config,
        tokenizer.eos_token_ids().to_vec(),
        max_model_len,
        ROLE,
    )?;
    tracing::info!(
        seconds = started.elapsed().as_secs_f64(),
        "model loaded and engine started"
    );
    Ok(ServedModel {
        infer: Arc::new(engine),
        tokenizer,
        chat_template,
        max_model_len,
    })
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
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
    use clap::Parser;

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

    #[test]
    fn flags_parse_and_names_default_to_the_model_plus_alias() {
        let cli = crate::cli::Cli::try_parse_from([
            "tandem",
            "serve",
            "--port",
            "0",
            "--served-model-name",
            "smol,tiny",
            "--kv-cache-memory",
            "256MiB",
        ])
        .unwrap();
        let crate::cli::Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.port, 0);
        assert_eq!(args.kv_cache_memory, 256 << 20);
        let config = server_config(&args, "SmolLM2-135M-Instruct");
        assert_eq!(config.model_name, "smol");
        assert_eq!(config.model_aliases, vec!["tiny", "default"]);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));

        let cli = crate::cli::Cli::try_parse_from(["tandem", "serve"]).unwrap();
        let crate::cli::Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let config = server_config(&args, "SmolLM2-135M-Instruct");
        assert_eq!(config.model_name, "SmolLM2-135M-Instruct");
        assert_eq!(config.model_aliases, vec!["default"]);
        assert_eq!(config.default_max_tokens, server::DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn defaults_are_the_engine_defaults() {
        let cli = crate::cli::Cli::try_parse_from(["tandem", "serve"]).unwrap();
        let crate::cli::Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        let engine = EngineConfig::default();
        assert_eq!(args.kv_cache_memory as usize, engine.kv_cache_bytes);
        assert_eq!(args.num_blocks, engine.num_blocks);
        assert_eq!(args.block_size, engine.block_size);
        assert_eq!(args.max_num_seqs, engine.max_num_seqs);
        assert_eq!(args.max_batch_tokens, engine.max_batch_tokens);
        assert_eq!(args.max_queue, engine.max_queue);
        assert_eq!(args.threads, engine.threads);
        assert_eq!(args.port, 8000);
        assert_eq!(args.host, "127.0.0.1");
    }

    #[test]
    fn kv_memory_and_num_blocks_conflict() {
        let err = crate::cli::Cli::try_parse_from([
            "tandem",
            "serve",
            "--kv-cache-memory",
            "1GiB",
            "--num-blocks",
            "100",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("cannot be used with"), "{err}");
        // The default memory budget does not conflict with an explicit block count.
        let cli =
            crate::cli::Cli::try_parse_from(["tandem", "serve", "--num-blocks", "100"]).unwrap();
        let crate::cli::Command::Serve(args) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.num_blocks, Some(100));
    }
}
