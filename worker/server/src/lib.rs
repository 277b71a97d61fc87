//! The OpenAI-compatible HTTP server: `/v1/chat/completions`, `/v1/completions`,
//! `/v1/models`, `/health`, `/metrics`, and vLLM's `/tokenize`, `/detokenize`, `/version`.
//!
//! The server only knows the `Infer` seam, so the same router fronts the
//! in-process engine (`tandem serve`) and the router to decode workers (`tandem frontend`).
//! The server binds before the model is loaded (`/health` answers 503 until
//! `AppState::set_model`), so orchestrators see "not ready" instead of
//! "connection refused" while weights load.

mod constraint;
mod error;
mod generate;
mod handlers;
mod params;
mod protocol;
mod request_context;
mod text;
mod tools;
mod utility;

use std::future::{Future, IntoFuture};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use params::MAX_TOP_LOGPROBS;
pub use text::{Released, StopMatcher, TextAssembler};

use tandem_api::infer::Infer;
use tandem_model::{ChatTemplate, Tokenizer};

/// Generation length when a request gives no `max_tokens`: the room left in
/// the context, but at most this many tokens. Unbounded by default would let
/// one forgotten `max_tokens` hold a sequence for the whole context (8192
/// tokens for the default model); OpenAI-compatible clients that want more
/// ask for it.
pub use tandem_api::args::DEFAULT_MAX_TOKENS;

/// Bodies beyond this are refused with 413. A full 8k-token prompt is tens of
/// KiB of JSON; this leaves ample room for long conversations.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Settings of the HTTP layer itself (the engine has its own).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients pass as `model` and see in `/v1/models`.
    pub model_name: String,
    /// Other names accepted as `model` (not listed in `/v1/models`).
    pub model_aliases: Vec<String>,
    pub default_max_tokens: usize,
    pub max_body_bytes: usize,
    /// Sent as `Retry-After` with 429 answers.
    pub retry_after_secs: u64,
    /// How long in-flight requests may run after a shutdown signal.
    pub shutdown_grace: Duration,
    /// The `Infer` is an engine in this process (`tandem serve`): record its
    /// phases (`queue`, `prefill`, `decode`) as spans when tracing is on.
    pub engine_phases: bool,
}

impl ServerConfig {
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            model_aliases: Vec::new(),
            default_max_tokens: DEFAULT_MAX_TOKENS,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            retry_after_secs: 1,
            shutdown_grace: Duration::from_secs(30),
            engine_phases: false,
        }
    }
}

/// What exists once the model is loaded: the backend that generates and the
/// text side of the model.
pub struct ServedModel {
    pub infer: Arc<dyn Infer>,
    pub tokenizer: Tokenizer,
    /// `None` for base models: chat completions are then refused with 400.
    pub chat_template: Option<ChatTemplate>,
    /// Prompt plus generated tokens may not exceed this.
    pub max_model_len: usize,
}

/// Shared by every handler.
pub struct AppState {
    config: ServerConfig,
    model: OnceLock<Arc<ServedModel>>,
    draining: AtomicBool,
    inflight: Arc<AtomicUsize>,
    started_unix: u64,
}

impl AppState {
    /// A server whose model is still loading: everything but `/metrics`
    /// answers 503 until `set_model`.
    pub fn new(config: ServerConfig) -> Arc<Self> {
        // The arrival series exists (at 0) from the first scrape, before any request: a planner
        // reading it tells "no traffic" (present, not rising) from "no data" (absent).
        tandem_api::metrics::metrics()
            .input_tokens
            .with_label_values(&[config.model_name.as_str()]);
        Arc::new(Self {
            config,
            model: OnceLock::new(),
            draining: AtomicBool::new(false),
            inflight: Arc::new(AtomicUsize::new(0)),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        })
    }

    /// A server ready at once (tests, or a caller that loaded first).
    pub fn with_model(config: ServerConfig, model: ServedModel) -> Arc<Self> {
        let state = Self::new(config);
        state.set_model(model);
        state
    }

    /// Make the server ready. A second call is ignored: the first model stays.
    pub fn set_model(&self, model: ServedModel) {
        if self.model.set(Arc::new(model)).is_err() {
            tracing::warn!("set_model called twice; keeping the first model");
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    pub fn model_name(&self) -> &str {
        &self.config.model_name
    }

    fn model_names(&self) -> params::ModelNames<'_> {
        params::ModelNames {
            name: &self.config.model_name,
            aliases: &self.config.model_aliases,
        }
    }

    /// Stop admitting: new requests and `/health` answer 503 from now on;
    /// requests already admitted run to the end.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Generation requests admitted and not finished (streams included).
    pub fn inflight_requests(&self) -> usize {
        self.inflight.load(Ordering::SeqCst)
    }

    /// `ready`, `loading` or `draining`; only `ready` serves.
    pub fn health(&self) -> &'static str {
        if self.is_draining() {
            "draining"
        } else if self.model.get().is_some_and(|model| model.infer.is_ready()) {
            "ready"
        } else {
            "loading"
        }
    }

    fn ready_model(&self) -> Result<Arc<ServedModel>, ApiError> {
        match self.health() {
            "ready" => Ok(self.model.get().expect("ready implies loaded").clone()),
            "draining" => Err(ApiError::unavailable(
                "The server is shutting down and accepts no new requests.",
            )),
            _ => Err(ApiError::unavailable("The model is still loading.")),
        }
    }

    fn inflight_counter(&self) -> Arc<AtomicUsize> {
        self.inflight.clone()
    }

    fn started_unix(&self) -> u64 {
        self.started_unix
    }
}

/// Every route of the server.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::list_models))
        // A wildcard: Hub names (`org/repo`) hold a slash.
        .route("/v1/models/{*model}", get(handlers::get_model))
        .route("/tokenize", post(utility::tokenize))
        .route("/detokenize", post(utility::detokenize))
        .route("/version", get(utility::version))
        .route("/health", get(handlers::health))
        .route("/metrics", get(handlers::prometheus_metrics))
        .fallback(handlers::unknown_route)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::middleware::from_fn(request_context::request_context))
        .with_state(state)
}

/// Serve until `shutdown` resolves, then drain: stop accepting connections,
/// answer 503 to new requests on open ones, and let admitted requests finish
/// for up to `shutdown_grace`; whatever still runs then is dropped (which
/// cancels it in the engine). Returns once drained.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = state.config.shutdown_grace;
    let drain_started = Arc::new(Notify::new());
    let signal = {
        let state = state.clone();
        let drain_started = drain_started.clone();
        async move {
            shutdown.await;
            state.begin_draining();
            tracing::info!(
                inflight = state.inflight_requests(),
                grace_secs = grace.as_secs_f64(),
                "shutting down: draining in-flight requests"
            );
            drain_started.notify_one();
        }
    };
    let server = axum::serve(listener, router(state.clone())).with_graceful_shutdown(signal);
    tokio::select! {
        result = server.into_future() => {
            tracing::info!("all requests drained");
            result
        }
        () = async {
            drain_started.notified().await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(
                cut = state.inflight_requests(),
                "shutdown grace period elapsed; dropping requests still in flight"
            );
            Ok(())
        }
    }
}
