//! The control endpoint of `tandem local` (`--control-port`): the local
//! stand-in for a StatefulSet's `replicas`, so the planner can scale tiers on
//! one machine.
//!
//! - `GET /tiers` → `{"prefill": {"replicas": N, "ready": R}, "decode": {...}}`
//! - `PUT /tiers/{prefill|decode}` with `{"replicas": N}` → starts workers or
//!   stops the highest indexes (gracefully); answers the new state. `ready`
//!   catches up as workers load.

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};

use super::{LocalError, Request};
use crate::discovery::Role;

pub use tandem_api::control::{ScaleRequest, TierStatus, Tiers};

pub(super) async fn serve(listener: tokio::net::TcpListener, supervisor: mpsc::Sender<Request>) {
    let app = Router::new()
        .route("/tiers", get(get_tiers))
        .route("/tiers/{tier}", get(get_tiers_of_one).put(put_tier))
        .with_state(supervisor);
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!("control endpoint stopped: {e}");
    }
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response {
    let body = serde_json::json!({"error": {"message": message.to_string()}});
    (status, Json(body)).into_response()
}

fn parse_tier(tier: &str) -> Option<Role> {
    match tier {
        "prefill" => Some(Role::Prefill),
        "decode" => Some(Role::Decode),
        _ => None,
    }
}

fn unknown_tier(tier: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("unknown tier `{tier}` (expected prefill or decode)"),
    )
}

fn stopped() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, LocalError::Stopped)
}

/// Asks the supervisor; `None` once it has stopped.
async fn current(supervisor: &mpsc::Sender<Request>) -> Option<Tiers> {
    let (reply, answer) = oneshot::channel();
    supervisor.send(Request::Tiers(reply)).await.ok()?;
    answer.await.ok()
}

async fn get_tiers(State(supervisor): State<mpsc::Sender<Request>>) -> Response {
    match current(&supervisor).await {
        Some(tiers) => Json(tiers).into_response(),
        None => stopped(),
    }
}

async fn get_tiers_of_one(
    State(supervisor): State<mpsc::Sender<Request>>,
    Path(tier): Path<String>,
) -> Response {
    let Some(role) = parse_tier(&tier) else {
        return unknown_tier(&tier);
    };
    match current(&supervisor).await {
        Some(tiers) if role == Role::Prefill => Json(tiers.prefill).into_response(),
        Some(tiers) => Json(tiers.decode).into_response(),
        None => stopped(),
    }
}

async fn put_tier(
    State(supervisor): State<mpsc::Sender<Request>>,
    Path(tier): Path<String>,
    body: Result<Json<ScaleRequest>, JsonRejection>,
) -> Response {
    let Some(role) = parse_tier(&tier) else {
        return unknown_tier(&tier);
    };
    let Json(ScaleRequest { replicas }) = match body {
        Ok(body) => body,
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "expected a body like {{\"replicas\": 2}}: {}",
                    rejection.body_text()
                ),
            )
        }
    };
    let (reply, answer) = oneshot::channel();
    let request = Request::Scale {
        role,
        replicas,
        reply,
    };
    if supervisor.send(request).await.is_err() {
        return stopped();
    }
    match answer.await {
        Ok(Ok(tiers)) => Json(tiers).into_response(),
        Ok(Err(e @ LocalError::TooManyReplicas { .. })) => error(StatusCode::BAD_REQUEST, e),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(_) => stopped(),
    }
}
