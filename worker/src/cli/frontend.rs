//! `tandem frontend`: the OpenAI API in front of decode workers. Loads only
//! the model's tokenizer and chat template (no weights), renders and
//! tokenizes, and routes each request to a decode worker over gRPC.
//! `/health` answers 200 once at least one decode worker answers.

use std::net::SocketAddr;

use anyhow::Context;

pub use tandem_api::args::FrontendArgs;
use tandem_model as model;

use super::common;
use super::discovery_args;
use tandem_disagg::roles::frontend::{Frontend, FrontendConfig};
use tandem_server::{self as server, AppState, ServedModel};

pub fn run(args: FrontendArgs) -> anyhow::Result<()> {
    common::runtime()?.block_on(frontend(args))
}

async fn frontend(args: FrontendArgs) -> anyhow::Result<()> {
    let template_file = common::ChatTemplateFile::read(args.chat_template.as_deref())?;
    let resolved = common::resolve_model(&args.http)?;
    let text = model::load_text(&resolved.path)?;
    let chat_template = match &template_file {
        Some(file) => Some(file.compile(&text.tokenizer)?),
        None => text.chat_template,
    };
    let config = common::server_config(&args.http, &resolved.info.name, args.default_max_tokens);
    common::configure_metrics(&args.http, &resolved.info.name);
    let membership =
        discovery_args::decode_membership(&args.discovery, &args.decode_workers).await?;
    let frontend = Frontend::start(
        FrontendConfig {
            router_mode: args.router_mode,
            block_size: args.block_size,
            migration_limit: args.migration_limit,
            model_name: config.model_name.clone(),
        },
        membership,
    )?;

    let addr = args.http.listen_address();
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let local: SocketAddr = listener.local_addr()?;
    let state = AppState::with_model(
        config,
        ServedModel {
            infer: frontend,
            tokenizer: text.tokenizer,
            chat_template,
            max_model_len: resolved.max_model_len,
        },
    );
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        address = %local,
        model = %state.model_name(),
        router_mode = %args.router_mode,
        "frontend listening (/health answers 503 until a decode worker is ready)"
    );
    server::serve(listener, state, common::shutdown_signal()).await?;
    tracing::info!("shut down");
    Ok(())
}
