//! The flags of each role: `serve`, `frontend`, `prefill`, `decode`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use super::{
    DecodeDiscoveryArgs, EngineArgs, ModelHttpArgs, PrefillDiscoveryArgs, DEFAULT_BLOCK_SIZE,
    DEFAULT_GRPC_PORT, DEFAULT_KV_TRANSFER_TIMEOUT, DEFAULT_MAX_TOKENS, DEFAULT_MIGRATION_LIMIT,
    DEFAULT_PREFILL_MAX_QUEUE, DEFAULT_REMOTE_PREFILL_MIN_TOKENS,
};

/// `tandem serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub http: ModelHttpArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Tokens generated when a request gives no `max_tokens` (never more than
    /// the room left in the context).
    #[arg(long, env = "TANDEM_DEFAULT_MAX_TOKENS", default_value_t = DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: usize,

    /// A Jinja chat template file that replaces the model's own (from its GGUF
    /// metadata, tokenizer_config.json or chat_template.jinja) for chat
    /// completions and `/tokenize` with `messages`. It is rendered with the
    /// variables a Hugging Face template gets (`messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`). A file that cannot
    /// be read, is empty or does not compile stops start-up with an error
    /// naming it.
    #[arg(long, env = "TANDEM_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

/// `tandem frontend`.
#[derive(Debug, Clone, clap::Args)]
pub struct FrontendArgs {
    #[command(flatten)]
    pub http: ModelHttpArgs,

    /// Decode workers' gRPC addresses (`host:port`, comma-separated), for
    /// `--discovery static`.
    #[arg(long, env = "TANDEM_DECODE_WORKERS", value_delimiter = ',')]
    pub decode_workers: Vec<String>,

    #[command(flatten)]
    pub discovery: DecodeDiscoveryArgs,

    /// How a decode worker is chosen: `kv` (prefix overlap and load),
    /// `round-robin` or `random`.
    #[arg(long, env = "TANDEM_ROUTER_MODE", default_value = "kv")]
    pub router_mode: RouterMode,

    /// Times a request may move to another decode worker when its worker is
    /// lost mid-request (0: fail instead).
    #[arg(long, env = "TANDEM_MIGRATION_LIMIT", default_value_t = DEFAULT_MIGRATION_LIMIT)]
    pub migration_limit: usize,

    /// Tokens per KV block of the decode workers (the router hashes prompts
    /// in blocks of this size to see what each worker caches).
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = DEFAULT_BLOCK_SIZE)]
    pub block_size: usize,

    /// Tokens generated when a request gives no `max_tokens` (never more than
    /// the room left in the context).
    #[arg(long, env = "TANDEM_DEFAULT_MAX_TOKENS", default_value_t = DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: usize,

    /// A Jinja chat template file that replaces the model's own (from its GGUF
    /// metadata, tokenizer_config.json or chat_template.jinja) for chat
    /// completions and `/tokenize` with `messages`. It is rendered with the
    /// variables a Hugging Face template gets (`messages`,
    /// `add_generation_prompt`, `bos_token`, `eos_token`). A file that cannot
    /// be read, is empty or does not compile stops start-up with an error
    /// naming it.
    #[arg(long, env = "TANDEM_CHAT_TEMPLATE", value_name = "FILE")]
    pub chat_template: Option<PathBuf>,
}

/// How the frontend picks a decode worker (`--router-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RouterMode {
    /// Prefix overlap and load (see the module docs).
    #[default]
    Kv,
    RoundRobin,
    Random,
}

impl RouterMode {
    pub fn as_str(self) -> &'static str {
        match self {
            RouterMode::Kv => "kv",
            RouterMode::RoundRobin => "round-robin",
            RouterMode::Random => "random",
        }
    }
}

impl fmt::Display for RouterMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RouterMode {
    type Err = UnknownRouterMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [RouterMode::Kv, RouterMode::RoundRobin, RouterMode::Random]
            .into_iter()
            .find(|mode| mode.as_str() == s)
            .ok_or_else(|| UnknownRouterMode(s.to_string()))
    }
}

/// A `--router-mode` that is none of `kv`, `round-robin`, `random`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown router mode '{0}' (expected kv, round-robin or random)")]
pub struct UnknownRouterMode(pub String);

/// KV transports a worker can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KvTransfer {
    /// `cuda-ipc` when prefill and decode both use CUDA on the same node
    /// (decided per peer), else gRPC.
    #[default]
    Auto,
    /// Streamed gRPC messages: works between any two hosts.
    Grpc,
    /// The prefill worker writes the KV straight into the decode worker's GPU
    /// pool; only for workers on one node, both on CUDA. A decode worker does
    /// not use prefill workers it cannot reach this way.
    CudaIpc,
}

/// Flags of every engine-owning worker role.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub http: ModelHttpArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// gRPC port for the worker protocol (0 picks a free one; the log says which).
    #[arg(long, env = "TANDEM_GRPC_PORT", default_value_t = DEFAULT_GRPC_PORT)]
    pub grpc_port: u16,

    /// How prompt KV travels from prefill to decode workers.
    #[arg(long, env = "TANDEM_KV_TRANSFER", value_enum, default_value = "auto")]
    pub kv_transfer: KvTransfer,
}

/// `tandem prefill`.
#[derive(Debug, Clone, clap::Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
}

/// `tandem decode`.
#[derive(Debug, Clone, clap::Args)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,

    /// Prefill workers' gRPC addresses (`host:port`, comma-separated), for
    /// `--discovery static`. None: every prompt is prefilled locally.
    #[arg(long, env = "TANDEM_PREFILL_WORKERS", value_delimiter = ',')]
    pub prefill_workers: Vec<String>,

    #[command(flatten)]
    pub discovery: PrefillDiscoveryArgs,

    /// Prompts with fewer tokens missing from this worker's prefix cache are
    /// prefilled here rather than on a prefill worker.
    #[arg(long, env = "TANDEM_REMOTE_PREFILL_MIN_TOKENS", default_value_t = DEFAULT_REMOTE_PREFILL_MIN_TOKENS)]
    pub remote_prefill_min_tokens: usize,

    /// A prefill worker with this many requests waiting has no room; prompts
    /// are then prefilled locally.
    #[arg(long, env = "TANDEM_PREFILL_MAX_QUEUE", default_value_t = DEFAULT_PREFILL_MAX_QUEUE)]
    pub prefill_max_queue: usize,

    /// Seconds without a message after which a KV transfer is abandoned (the
    /// prompt is then prefilled elsewhere).
    #[arg(long, env = "TANDEM_KV_TRANSFER_TIMEOUT_SECS", default_value_t = DEFAULT_KV_TRANSFER_TIMEOUT.as_secs_f64())]
    pub kv_transfer_timeout_secs: f64,
}
