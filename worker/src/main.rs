use clap::Parser;

use tandem::cli::{self, Cli, Command};

fn main() -> anyhow::Result<()> {
    cli::init_tracing();
    let args = Cli::parse();
    match args.command {
        Command::Serve(a) => cli::serve::run(a),
        Command::Model(c) => cli::model::run(c),
        Command::Bench(a) => cli::bench::run(*a),
    }
}
