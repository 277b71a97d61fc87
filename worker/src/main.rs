use std::process::ExitCode;

use tandem::cli::{self, Cli, Command, RoleCommand};

fn main() -> ExitCode {
    let args = Cli::parse_with_tracing_help();
    let log_format = args.log_format.parse().unwrap_or_default();
    // Held to the end: dropping it exports the spans still buffered.
    let _telemetry = tandem_telemetry::init(args.command.service_name(), log_format);
    let result = match args.command {
        Command::Role(RoleCommand::Serve(a)) => cli::serve::run(a),
        Command::Role(RoleCommand::Frontend(a)) => cli::frontend::run(a),
        Command::Role(RoleCommand::Prefill(a)) => cli::worker::run_prefill(a),
        Command::Role(RoleCommand::Decode(a)) => cli::worker::run_decode(a),
        Command::Role(RoleCommand::Model(c)) => cli::model::run(c),
        Command::Bench(a) => cli::bench::run(*a),
        Command::Gpu(c) => cli::gpu::run(c),
        Command::Local(a) => cli::local::run(a, log_format),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole cause chain on one line; anyhow's Debug form
            // would add a backtrace whenever RUST_BACKTRACE is set.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
