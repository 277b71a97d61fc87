//! The flags of the roles the operator renders into pods: `serve`, `frontend`, `prefill`,
//! `decode` and `model fetch`. The `tandem` binary parses these very structs, and the
//! operator's tests parse every command line it renders with [`RoleCli`], so the two cannot
//! drift apart. Every flag is also read from a `TANDEM_*` environment variable.
//!
//! Defaults live here as constants; the crates that act on a flag use the same constant.

mod discovery;
mod engine;
mod model;
mod roles;

use std::time::Duration;

pub use discovery::{DecodeDiscoveryArgs, DiscoveryMode, PrefillDiscoveryArgs};
pub use engine::{parse_byte_size, DeviceArgs, DeviceSpec, EngineArgs, LoadFormat};
pub use model::{ModelCommand, ModelHttpArgs};
pub use roles::{
    DecodeArgs, FrontendArgs, KvTransfer, PrefillArgs, RouterMode, ServeArgs, UnknownRouterMode,
    WorkerArgs,
};

/// The name of the model `tandem` serves and fetches when none is given.
pub const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";
/// The alias every server accepts as `model`, so clients that do not care which model they
/// talk to need not look the name up first.
pub const DEFAULT_MODEL_ALIAS: &str = "default";
/// `--kv-cache-memory` when not given: the engine's default budget.
pub const DEFAULT_KV_CACHE_MEMORY: &str = "512MiB";
/// `--kv-cache-memory` in bytes.
pub const DEFAULT_KV_CACHE_BYTES: usize = 512 << 20;
/// `--block-size`: tokens per KV cache block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
/// `--max-num-seqs`: sequences in the running batch at once.
pub const DEFAULT_MAX_NUM_SEQS: usize = 64;
/// `--max-batch-tokens`: the token budget of one engine step.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 512;
/// `--max-queue`: requests that may wait for admission.
pub const DEFAULT_MAX_QUEUE: usize = 256;
/// `--threads`: 0 is one compute thread per core.
pub const DEFAULT_THREADS: usize = 0;
/// `--gpu-memory-utilization`.
pub const DEFAULT_GPU_MEMORY_UTILIZATION: f32 = 0.9;
/// `--default-max-tokens`: tokens generated when a request gives no `max_tokens`.
pub const DEFAULT_MAX_TOKENS: usize = 1024;
/// `--grpc-port` (the operator's headless Services use it too).
pub const DEFAULT_GRPC_PORT: u16 = 9000;
/// `--migration-limit`: times a request may move to another decode worker.
pub const DEFAULT_MIGRATION_LIMIT: usize = 3;
/// `--remote-prefill-min-tokens`. See `docs/benchmarks.md` ("Remote prefill threshold") for
/// the measurement behind it.
pub const DEFAULT_REMOTE_PREFILL_MIN_TOKENS: usize = 256;
/// `--prefill-max-queue`: a prefill worker with this many requests waiting has no room.
pub const DEFAULT_PREFILL_MAX_QUEUE: usize = 4;
/// `--kv-transfer-timeout-secs`.
pub const DEFAULT_KV_TRANSFER_TIMEOUT: Duration = Duration::from_secs(10);

/// The command lines of the roles the operator renders, as the `tandem` binary parses them.
/// The binary's own command line adds its other subcommands (`local`, `bench`, `gpu`) beside
/// these.
#[derive(Debug, clap::Parser)]
#[command(name = "tandem")]
pub struct RoleCli {
    #[command(subcommand)]
    pub command: RoleCommand,
}

// Parsed once at startup: the size of the serve variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum RoleCommand {
    /// One process, aggregated: the OpenAI API and the engine together.
    Serve(ServeArgs),
    /// The OpenAI API in front of decode workers: tokenizes, routes (KV-aware),
    /// migrates requests off failed workers. Loads no weights.
    Frontend(FrontendArgs),
    /// A prefill worker: runs prompts and streams their KV to decode workers.
    Prefill(PrefillArgs),
    /// A decode worker: generates tokens; prefills long uncached prompts on
    /// prefill workers, short ones itself.
    Decode(DecodeArgs),
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(ModelCommand),
}
