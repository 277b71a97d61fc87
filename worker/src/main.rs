use clap::{Parser, Subcommand};

use tandem::cli;

/// Tandem serves large language models with prefill and decode on separate,
/// separately scaled workers.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One process, aggregated: the OpenAI API and the engine together.
    Serve(cli::serve::ServeArgs),
    /// Fetch, list and inspect models.
    #[command(subcommand)]
    Model(cli::model::ModelCommand),
}

fn main() -> anyhow::Result<()> {
    cli::init_tracing();
    let args = Cli::parse();
    match args.command {
        Command::Serve(a) => cli::serve::run(a),
        Command::Model(c) => cli::model::run(c),
    }
}
