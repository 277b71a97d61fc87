//! The server over real sockets: a client that hangs up cancels its request
//! in the engine, and a shutdown signal drains (new requests refused or 503,
//! in-flight ones finish, bounded by the grace period).

mod server_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::json;
use server_support::*;
use tandem_server::{router, AppState, ServedModel, ServerConfig};
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

const CONTEXT: usize = 512;

fn stream_request() -> serde_json::Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": "go"}], "stream": true})
}

fn state_with_grace(fake: Arc<FakeInfer>, grace: Duration) -> Arc<AppState> {
    let mut config = ServerConfig::new(MODEL);
    config.shutdown_grace = grace;
    AppState::with_model(
        config,
        ServedModel {
            infer: fake,
            tokenizer: tokenizer(),
            chat_template: Some(tandem_model::ChatTemplate::new(CHATML, "", "").unwrap()),
            max_model_len: CONTEXT,
        },
    )
}

#[tokio::test]
async fn client_disconnect_cancels_the_engine_request() {
    let reply = "a long answer that keeps going ".repeat(8);
    let total = encode(&reply).len();
    let fake =
        Arc::new(FakeInfer::replying(encode(&reply)).with_token_delay(Duration::from_millis(10)));
    let state = state_with(fake.clone(), CONTEXT);
    let (addr, _stop, _task) = start_server(state.clone()).await;

    let mut conn = open_request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&stream_request()),
    )
    .await
    .unwrap();
    // Read until a content chunk arrived: the request is generating.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"content\":\"a") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "server closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    drop(conn);

    assert!(
        eventually(|| fake.cancelled_ids().len() == 1).await,
        "dropping the connection cancels the request"
    );
    let id = fake.last_request().id;
    let sent = fake.tokens_sent.lock().unwrap()[&id];
    assert!(
        sent < total,
        "generation stopped early ({sent} of {total} tokens)"
    );
    assert!(eventually(|| state.inflight_requests() == 0).await);
}

#[tokio::test]
async fn non_streaming_client_disconnect_cancels_too() {
    let reply = "x".repeat(300);
    let fake =
        Arc::new(FakeInfer::replying(encode(&reply)).with_token_delay(Duration::from_millis(5)));
    let (addr, _stop, _task) = start_server(state_with(fake.clone(), CONTEXT)).await;
    let body = json!({"model": MODEL, "prompt": "go", "max_tokens": 300});
    let conn = open_request(addr, "POST", "/v1/completions", Some(&body))
        .await
        .unwrap();
    assert!(eventually(|| !fake.requests.lock().unwrap().is_empty()).await);
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(conn);
    assert!(
        eventually(|| fake.cancelled_ids().len() == 1).await,
        "hyper drops the handler future when the client hangs up"
    );
}

#[tokio::test]
async fn draining_refuses_new_requests_and_lets_in_flight_finish() {
    let gate = Arc::new(Semaphore::new(0));
    let fake = Arc::new(FakeInfer::replying(encode("done")).with_gate(gate.clone()));
    let state = state_with(fake.clone(), CONTEXT);
    let app = router(state.clone());

    let in_flight = {
        let app = app.clone();
        tokio::spawn(async move {
            send(&app, post_json("/v1/chat/completions", &stream_request())).await
        })
    };
    assert!(eventually(|| !fake.requests.lock().unwrap().is_empty()).await);

    state.begin_draining();
    let (status, body) = send_json(&app, get("/health")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "draining");
    let (status, body) =
        send_json(&app, post_json("/v1/chat/completions", &stream_request())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
    assert_eq!(
        fake.requests.lock().unwrap().len(),
        1,
        "the engine saw no new request"
    );

    gate.add_permits(100);
    let (status, _, body) = in_flight.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let chunks = sse_chunks(&body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "done");
    assert!(fake.cancelled_ids().is_empty());
}

#[tokio::test]
async fn shutdown_signal_waits_for_in_flight_then_returns() {
    let gate = Arc::new(Semaphore::new(0));
    let fake = Arc::new(FakeInfer::replying(encode("finished fine")).with_gate(gate.clone()));
    let state = state_with_grace(fake.clone(), Duration::from_secs(10));
    let (addr, stop, task) = start_server(state.clone()).await;

    let conn = open_request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&stream_request()),
    )
    .await
    .unwrap();
    let in_flight = tokio::spawn(read_response(conn));
    assert!(eventually(|| state.inflight_requests() == 1).await);

    stop.send(()).unwrap();
    assert!(eventually(|| state.is_draining()).await);
    // A new client is refused: either the listener is closed or it gets 503.
    if let Ok(conn) = open_request(addr, "GET", "/health", None).await {
        let (status, _) = tokio::time::timeout(Duration::from_secs(2), read_response(conn))
            .await
            .expect("answered");
        assert_eq!(status, 503);
    }
    assert!(!task.is_finished(), "still draining the in-flight request");

    gate.add_permits(100);
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    let chunks = sse_chunks(&body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "finished fine");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns once drained")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn shutdown_gives_up_after_the_grace_period() {
    let gate = Arc::new(Semaphore::new(0)); // never opened: the request hangs
    let fake = Arc::new(FakeInfer::replying(encode("never")).with_gate(gate));
    let state = state_with_grace(fake, Duration::from_millis(300));
    let (addr, stop, task) = start_server(state.clone()).await;
    let _conn = open_request(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(&stream_request()),
    )
    .await
    .unwrap();
    assert!(eventually(|| state.inflight_requests() == 1).await);

    let started = Instant::now();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("serve returns after the grace period")
        .unwrap()
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "waited {waited:?}"
    );
}
