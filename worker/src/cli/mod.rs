//! Subcommands of the `tandem` binary. `main.rs` only dispatches here.

pub mod bench;
pub mod common;
pub mod discovery_args;
pub mod frontend;
pub mod gpu;
pub mod gpu_transfer;
pub mod local;
pub mod model;
pub mod serve;
pub mod worker;

use clap::{Parser, Subcommand};

/// Tandem serves large language models with prefill and decode on separate,
/// separately scaled workers.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at startup: the size of the serve variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// One process, aggregated: the OpenAI API and the engine together.
    Serve(serve::ServeArgs),
    /// The OpenAI API in front of decode workers: tokenizes, routes (KV-aware),
    /// migrates requests off failed workers. Loads no weights.
    Frontend(frontend::FrontendArgs),
    /// A prefill worker: runs prompts and streams their KV to decode workers.
    Prefill(worker::PrefillArgs),
    /// A decode worker: generates tokens; prefills long uncached prompts on
    /// prefill workers, short ones itself.
    Decode(worker::DecodeArgs),
    // The help text is `LocalArgs`' doc comment.
    Local(local::LocalArgs),
    // The help text is `BenchArgs`' doc comment.
    Bench(Box<bench::BenchArgs>),
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The CUDA backend on this machine's GPU: correctness checks, benchmarks.
    #[command(subcommand)]
    Gpu(gpu::GpuCommand),
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only help a person at a terminal; in log files they are noise.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
