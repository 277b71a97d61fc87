//! `tandem frontend`: the OpenAI API in front of decode workers. Loads only
//! the model's tokenizer and chat template (no weights), renders and
//! tokenizes, and routes each request to a decode worker over gRPC.
//! `/health` answers 200 once at least one decode worker answers.

use std::net::SocketAddr;

use anyhow::Context;

use super::common::{self, ModelHttpArgs};
use super::discovery_args::DecodeDiscoveryArgs;
use crate::engine::EngineConfig;
use crate::model;
use crate::roles::frontend::{Frontend, FrontendConfig, DEFAULT_MIGRATION_LIMIT};
use crate::router::RouterMode;
use crate::server::{self, AppState, ServedModel};

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
    #[arg(long, env = "TANDEM_BLOCK_SIZE", default_value_t = EngineConfig::default().block_size)]
    pub block_size: usize,

    /// Tokens generated when a request gives no `max_tokens` (never more than
    /// the room left in the context).
    #[arg(long, env = "TANDEM_DEFAULT_MAX_TOKENS", default_value_t = common::DEFAULT_MAX_TOKENS)]
    pub default_max_tokens: usize,
}

pub fn run(args: FrontendArgs) -> anyhow::Result<()> {
    common::runtime()?.block_on(frontend(args))
}

async fn frontend(args: FrontendArgs) -> anyhow::Result<()> {
    let resolved = common::resolve_model(&args.http)?;
    let text = model::load_text(&resolved.path)?;
    let config = args
        .http
        .server_config(&resolved.info.name, args.default_max_tokens);
    let membership = args.discovery.membership(&args.decode_workers).await?;
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
            chat_template: text.chat_template,
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
