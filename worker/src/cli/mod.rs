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
pub use tandem_api::args::RoleCommand;

/// Tandem serves large language models with prefill and decode on separate,
/// separately scaled workers.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The roles the operator renders (`serve`, `frontend`, `prefill`, `decode`, `model`):
    /// their flags are `tandem_api::args`', shared with the operator.
    #[command(flatten)]
    Role(RoleCommand),
    // The help text is `LocalArgs`' doc comment.
    Local(local::LocalArgs),
    // The help text is `BenchArgs`' doc comment.
    Bench(Box<bench::BenchArgs>),
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

#[cfg(test)]
mod tests {
    /// The flags contract names the default model too (for `model fetch`'s default): both
    /// must name the model the cache fetches.
    #[test]
    fn the_flags_default_model_is_the_model_crates() {
        assert_eq!(tandem_api::args::DEFAULT_MODEL, tandem_model::DEFAULT_MODEL);
    }
}
