//! `tandem serve`: the aggregated server, the OpenAI API and the engine in one
//! process.
//!
//! Order matters for orchestration: the model file is resolved and inspected
//! (fast, metadata only) so the served name is known, then the port is bound
//! and `/health` answers 503 while the weights load and the engine starts,
//! then 200. SIGTERM or SIGINT drains: new requests get 503, admitted ones
//! finish within `--shutdown-grace-secs`, and the process exits 0.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

pub use tandem_api::args::ServeArgs;

use super::common;
use tandem_server::{self as server, AppState, ServedModel};

pub use super::common::{parse_byte_size, DEFAULT_MODEL_ALIAS};

/// The `role` label of this process's worker metrics.
const ROLE: &str = "aggregated";

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    common::runtime()?.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let template_file = common::ChatTemplateFile::read(args.chat_template.as_deref())?;
    let model = common::resolve_model(&args.http)?;
    let max_model_len = model.max_model_len;
    let mut config = common::server_config(&args.http, &model.info.name, args.default_max_tokens);
    // The engine runs here: its phases are this process's spans.
    config.engine_phases = true;
    common::configure_metrics(&args.http, &model.info.name);

    let addr = args.http.listen_address();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        address = %local,
        model = %config.model_name,
        path = %model.path.display(),
        "listening; loading the model (/health answers 503 until ready)"
    );

    let state = AppState::new(config);
    let mut server = tokio::spawn(server::serve(
        listener,
        state.clone(),
        common::shutdown_signal(),
    ));

    let loading = tokio::task::spawn_blocking({
        let engine_args = args.engine.clone();
        let path = model.path.clone();
        move || common::load_engine(&path, &engine_args, max_model_len, ROLE)
    });
    tokio::select! {
        loaded = loading => {
            let loaded = loaded.context("model loading panicked")??;
            let chat_template = match &template_file {
                Some(file) => Some(file.compile(&loaded.tokenizer)?),
                None => loaded.chat_template,
            };
            state.set_model(ServedModel {
                infer: Arc::new(loaded.engine),
                tokenizer: loaded.tokenizer,
                chat_template,
                max_model_len,
            });
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::time::Duration;
    use tandem_engine::EngineConfig;

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
        let crate::cli::Command::Role(crate::cli::RoleCommand::Serve(args)) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.http.port, 0);
        assert_eq!(args.engine.kv_cache_memory, 256 << 20);
        let config =
            common::server_config(&args.http, "SmolLM2-135M-Instruct", args.default_max_tokens);
        assert_eq!(config.model_name, "smol");
        assert_eq!(config.model_aliases, vec!["tiny", "default"]);
        assert_eq!(config.shutdown_grace, Duration::from_secs(30));

        let cli = crate::cli::Cli::try_parse_from(["tandem", "serve"]).unwrap();
        let crate::cli::Command::Role(crate::cli::RoleCommand::Serve(args)) = cli.command else {
            panic!("serve")
        };
        let config =
            common::server_config(&args.http, "SmolLM2-135M-Instruct", args.default_max_tokens);
        assert_eq!(config.model_name, "SmolLM2-135M-Instruct");
        assert_eq!(config.model_aliases, vec!["default"]);
        assert_eq!(config.default_max_tokens, server::DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn defaults_are_the_engine_defaults() {
        let cli = crate::cli::Cli::try_parse_from(["tandem", "serve"]).unwrap();
        let crate::cli::Command::Role(crate::cli::RoleCommand::Serve(args)) = cli.command else {
            panic!("serve")
        };
        let engine = EngineConfig::default();
        assert_eq!(args.engine.kv_cache_memory as usize, engine.kv_cache_bytes);
        assert_eq!(args.engine.num_blocks, engine.num_blocks);
        assert_eq!(args.engine.block_size, engine.block_size);
        assert_eq!(args.engine.max_num_seqs, engine.max_num_seqs);
        assert_eq!(args.engine.max_batch_tokens, engine.max_batch_tokens);
        assert_eq!(args.engine.max_queue, engine.max_queue);
        assert_eq!(args.engine.threads, engine.threads);
        assert_eq!(args.http.port, 8000);
        assert_eq!(args.http.host, "127.0.0.1");
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
        let crate::cli::Command::Role(crate::cli::RoleCommand::Serve(args)) = cli.command else {
            panic!("serve")
        };
        assert_eq!(args.engine.num_blocks, Some(100));
    }
}
