//! [`LocalTarget`], the planner's client of `tandem local`'s control endpoint, against an
//! endpoint that speaks the contract's JSON (`tandem_api::control`, the same types the
//! supervisor serves) and answers errors the way the supervisor does. The supervisor's own
//! side of the endpoint is tested in the worker (`worker/tests/local_supervisor.rs`), and the
//! whole loop — the real `tandem local`, a real Prometheus, this target — in
//! `planner_local_loop.rs`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tandem_api::control::{ScaleRequest, TierStatus, Tiers};
use tandem_operator::planner::local::LocalTarget;
use tandem_operator::planner::{ScaleTarget, Tier, TierReplicas};

/// Most replicas a tier may have, as the supervisor enforces.
const MAX_REPLICAS: usize = 64;

type Shared = Arc<Mutex<Tiers>>;

fn tier_of<'a>(tiers: &'a mut Tiers, name: &str) -> Option<&'a mut TierStatus> {
    match name {
        "prefill" => Some(&mut tiers.prefill),
        "decode" => Some(&mut tiers.decode),
        _ => None,
    }
}

fn error(status: StatusCode, message: String) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"message": message}})),
    )
        .into_response()
}

async fn get_tier(State(state): State<Shared>, Path(name): Path<String>) -> Response {
    let mut tiers = state.lock().unwrap();
    match tier_of(&mut tiers, &name) {
        Some(tier) => Json(*tier).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no tier {name:?}")),
    }
}

/// Resizes at once and reports every worker ready, like a supervisor whose workers load
/// instantly.
async fn put_tier(
    State(state): State<Shared>,
    Path(name): Path<String>,
    Json(request): Json<ScaleRequest>,
) -> Response {
    let mut tiers = state.lock().unwrap();
    if request.replicas > MAX_REPLICAS {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} {name} replicas is more than the {MAX_REPLICAS} tandem local runs per tier",
                request.replicas
            ),
        );
    }
    match tier_of(&mut tiers, &name) {
        Some(tier) => {
            *tier = TierStatus {
                replicas: request.replicas,
                ready: request.replicas,
            };
            Json(*tiers).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no tier {name:?}")),
    }
}

#[tokio::test]
async fn the_planner_reads_and_resizes_tiers_through_the_control_contract() {
    let one = TierStatus {
        replicas: 1,
        ready: 1,
    };
    let state: Shared = Arc::new(Mutex::new(Tiers {
        prefill: one,
        decode: one,
    }));
    let app = Router::new()
        .route("/tiers/{tier}", get(get_tier).put(put_tier))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
    });

    // The URL may name the tiers path too.
    let mut target = LocalTarget::new(&format!("http://127.0.0.1:{port}/tiers/")).unwrap();
    assert_eq!(
        target.replicas(Tier::Prefill).await.unwrap(),
        TierReplicas {
            desired: 1,
            ready: 1
        }
    );

    target.set_desired(Tier::Prefill, 3).await.unwrap();
    assert_eq!(
        state.lock().unwrap().prefill.replicas,
        3,
        "the PUT reached the tier"
    );
    assert_eq!(
        target.replicas(Tier::Prefill).await.unwrap(),
        TierReplicas {
            desired: 3,
            ready: 3
        }
    );
    assert_eq!(
        target.replicas(Tier::Decode).await.unwrap(),
        TierReplicas {
            desired: 1,
            ready: 1
        },
        "the other tier is untouched"
    );

    // The endpoint's own error message reaches the planner.
    let error = target
        .set_desired(Tier::Decode, 65)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("400") && error.contains("65 decode replicas is more than the 64"),
        "{error}"
    );

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the endpoint stops")
        .unwrap()
        .unwrap();
    let error = target.replicas(Tier::Decode).await.unwrap_err().to_string();
    assert!(
        error.contains("is `tandem local --control-port` running?"),
        "{error}"
    );
}
