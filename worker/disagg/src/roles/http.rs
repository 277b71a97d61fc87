//! The HTTP side of prefill and decode workers: `/health` (200 once the engine
//! runs, 503 while loading or draining) and `/metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use tandem_api::infer::Infer;
use tandem_api::metrics::metrics;

/// What `/health` looks at.
#[derive(Default)]
pub struct WorkerHealth {
    engine: OnceLock<Arc<dyn Infer>>,
    draining: AtomicBool,
}

impl WorkerHealth {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The engine is running: `/health` may answer 200.
    pub fn set_engine(&self, engine: Arc<dyn Infer>) {
        let _ = self.engine.set(engine);
    }

    /// Shutting down: `/health` answers 503 so traffic moves elsewhere.
    pub fn begin_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn status(&self) -> (StatusCode, &'static str) {
        if self.draining.load(Ordering::SeqCst) {
            return (StatusCode::SERVICE_UNAVAILABLE, "draining");
        }
        match self.engine.get() {
            Some(e) if e.is_ready() => (StatusCode::OK, "ready"),
            Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "engine stopped"),
            None => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        }
    }
}

pub fn router(health: Arc<WorkerHealth>) -> Router {
    Router::new()
        .route("/health", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(health)
}

async fn health_handler(State(health): State<Arc<WorkerHealth>>) -> impl IntoResponse {
    let (code, text) = health.status();
    (code, axum::Json(serde_json::json!({ "status": text })))
}

async fn metrics_handler() -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().render(),
    )
}
