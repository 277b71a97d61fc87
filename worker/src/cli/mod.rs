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
#[command(name = "tandem", version, about, long_about = None, after_help = TRACING_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,

    /// Log lines on stderr: `text` (one line per event) or `json` (one object
    /// per line, the operator's format, for log collectors). Lines about a
    /// request carry its `request_id` (the client's `x-request-id`, or a new
    /// one) in every role. `tandem local` passes it on to its processes.
    /// RUST_LOG filters (default `info`).
    #[arg(
        long,
        global = true,
        env = "TANDEM_LOG_FORMAT",
        default_value = "text",
        value_parser = ["json", "text"]
    )]
    pub log_format: String,
}

/// Tracing's switches, shown under every command's `--help`.
const TRACING_HELP: &str = "\
Tracing (docs/tracing.md): set OTEL_EXPORTER_OTLP_ENDPOINT (or
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) to export spans over OTLP; protocol by
OTEL_EXPORTER_OTLP_PROTOCOL (http/protobuf, the default, or grpc); service.name
tandem-<role> unless OTEL_SERVICE_NAME says otherwise; OTEL_TRACES_SAMPLER(_ARG),
OTEL_RESOURCE_ATTRIBUTES, OTEL_SDK_DISABLED and OTEL_TRACES_EXPORTER=none as the
OpenTelemetry spec says. A client's traceparent and x-request-id are honoured.";

impl Cli {
    /// The command line, with the tracing note under the `--help` of the
    /// serving commands too (their flags are `tandem_api::args`', which
    /// know nothing of tracing).
    pub fn parse_with_tracing_help() -> Self {
        use clap::FromArgMatches;
        Self::from_arg_matches(&Self::command_with_tracing_help().get_matches())
            .unwrap_or_else(|e| e.exit())
    }

    fn command_with_tracing_help() -> clap::Command {
        use clap::CommandFactory;
        Self::command().mut_subcommands(|sub| match sub.get_name() {
            "serve" | "frontend" | "prefill" | "decode" | "local" => sub.after_help(TRACING_HELP),
            _ => sub,
        })
    }
}

impl Command {
    /// `service.name` of this process's spans unless `OTEL_SERVICE_NAME` says otherwise.
    pub fn service_name(&self) -> &'static str {
        match self {
            Command::Role(RoleCommand::Serve(_)) => "tandem-serve",
            Command::Role(RoleCommand::Frontend(_)) => "tandem-frontend",
            Command::Role(RoleCommand::Prefill(_)) => "tandem-prefill",
            Command::Role(RoleCommand::Decode(_)) => "tandem-decode",
            Command::Role(RoleCommand::Model(_)) => "tandem-model",
            Command::Local(_) => "tandem-local",
            Command::Bench(_) => "tandem-bench",
            Command::Gpu(_) => "tandem-gpu",
        }
    }
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    /// The log format is global: after the role as the operator renders
    /// flags, or before it; `json` or `text` only.
    #[test]
    fn the_log_format_is_accepted_after_any_command() {
        let cli = super::Cli::try_parse_from(["tandem", "decode", "--log-format", "json"]).unwrap();
        assert_eq!(cli.log_format, "json");
        assert_eq!(cli.command.service_name(), "tandem-decode");
        let cli =
            super::Cli::try_parse_from(["tandem", "--log-format", "text", "frontend"]).unwrap();
        assert_eq!(cli.log_format, "text");
        assert!(super::Cli::try_parse_from(["tandem", "serve", "--log-format", "xml"]).is_err());
    }

    /// `tandem decode --help` tells how to turn tracing on.
    #[test]
    fn the_serving_commands_help_tells_of_tracing() {
        let mut command = super::Cli::command_with_tracing_help();
        // Global flags reach the subcommands when the command is built, as parsing does.
        command.build();
        let help = command
            .find_subcommand_mut("decode")
            .unwrap()
            .render_help()
            .to_string();
        assert!(help.contains("OTEL_EXPORTER_OTLP_ENDPOINT"), "{help}");
        assert!(help.contains("--log-format"), "{help}");
    }

    /// The flags contract names the default model too (for `model fetch`'s default): both
    /// must name the model the cache fetches.
    #[test]
    fn the_flags_default_model_is_the_model_crates() {
        assert_eq!(tandem_api::args::DEFAULT_MODEL, tandem_model::DEFAULT_MODEL);
    }
}
