//! The HTTP layer over the real engine (a random tiny model, so it runs in
//! milliseconds): a client that hangs up frees its KV blocks, a stop string
//! stops the engine sequence, and a full queue answers 429.

mod engine_support;
mod server_support;

use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use server_support::*;
use tandem_engine::backend::{CpuBackend, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::{ChatTemplate, ModelConfig};
use tandem_server::{router, AppState, ServedModel, ServerConfig};
use tokio::io::AsyncReadExt;

const MAX_MODEL_LEN: usize = 256;

fn engine(cfg: EngineConfig) -> EngineHandle {
    engine_of(tiny_model(), cfg)
}

fn tiny_model() -> ModelConfig {
    let mut model = engine_support::tiny_config(engine_support::GQA);
    // Room for the byte-level test tokenizer's 263 tokens.
    model.vocab_size = tokenizer().vocab_size();
    model
}

/// Big enough that one token takes milliseconds: a request is still
/// generating when the test acts on it.
fn slow_model() -> ModelConfig {
    let mut model = tiny_model();
    model.hidden_size = 256;
    model.intermediate_size = 768;
    model.num_layers = 4;
    model.num_heads = 4;
    model.num_kv_heads = 2;
    model.head_dim = 64;
    model
}

fn engine_of(model: ModelConfig, cfg: EngineConfig) -> EngineHandle {
    let weights = engine_support::random_weights(&model, 7);
    let backend = CpuBackend::new(model, &weights, WeightStorage::F32).unwrap();
    Engine::start(Box::new(backend), cfg, vec![EOS], MAX_MODEL_LEN, "test").unwrap()
}

fn engine_config(max_num_seqs: usize, max_queue: usize) -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks: Some(128),
        max_batch_tokens: 64,
        max_num_seqs,
        max_queue,
        threads: 1,
        ..EngineConfig::default()
    }
}

fn state(engine: &EngineHandle) -> Arc<AppState> {
    AppState::with_model(
        ServerConfig::new(MODEL),
        ServedModel {
            infer: Arc::new(engine.clone()),
            tokenizer: tokenizer(),
            chat_template: Some(ChatTemplate::new(CHATML, "", "").unwrap()),
            max_model_len: MAX_MODEL_LEN,
        },
    )
}

fn completion(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL, "prompt": "The tiny model says", "max_tokens": 150,
        "temperature": 0, "ignore_eos": true,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn client_disconnect_frees_the_sequence_blocks() {
    let engine = engine_of(slow_model(), engine_config(4, 16));
    let (addr, _stop, _task) = start_server(state(&engine)).await;
    let mut conn = open_request(
        addr,
        "POST",
        "/v1/completions",
        Some(&completion(json!({"stream": true, "max_tokens": 200}))),
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    assert!(
        eventually(|| engine.stats().running == 1 && engine.stats().kv_blocks_used > 0).await,
        "generating: {:?}",
        engine.stats()
    );
    drop(conn);
    let stats = settled_stats(&engine).await;
    assert!(
        stats.decode_tokens < 200,
        "the engine stopped before max_tokens: {stats:?}"
    );
}

/// The engine's counters once it has nothing running (stats are published
/// after each engine step, so wait for the snapshot that follows the work).
async fn settled_stats(engine: &EngineHandle) -> tandem_engine::EngineStats {
    assert!(
        eventually(|| {
            let s = engine.stats();
            s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0
        })
        .await,
        "engine still busy: {:?}",
        engine.stats()
    );
    engine.stats()
}

#[tokio::test]
async fn stop_string_ends_text_and_engine_sequence() {
    let engine = engine_of(slow_model(), engine_config(4, 16));
    let app = router(state(&engine));
    let (status, whole) = send_json(
        &app,
        post_json("/v1/completions", &completion(json!({"max_tokens": 60}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string taken from the middle of the greedy output.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 30, "greedy text: {text:?}");
    let stop: String = chars[20..23].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];
    let before = settled_stats(&engine).await.decode_tokens;

    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/completions",
            &completion(json!({"stop": [stop], "max_tokens": 120})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], expected);
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let received = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(received < 60, "stopped at the match: {received}");
    // The engine stopped soon after the match, not at max_tokens.
    let decoded = settled_stats(&engine).await.decode_tokens - before;
    assert!(
        decoded < 120,
        "engine decoded {decoded} tokens; the response used {received}"
    );
}

#[tokio::test]
async fn full_queue_answers_429_with_retry_after() {
    // One running sequence, one waiting: a burst must overflow.
    let engine = engine(engine_config(1, 1));
    let app = router(state(&engine));
    let requests: Vec<_> = (0..12)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move {
                send(
                    &app,
                    post_json("/v1/completions", &completion(json!({"max_tokens": 200}))),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    let mut overloaded = 0;
    for r in requests {
        let (status, headers, body) = r.await.unwrap();
        match status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                overloaded += 1;
                assert!(headers.contains_key("retry-after"));
                let body: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(body["error"]["code"], "server_overloaded");
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&body)),
        }
    }
    assert!(
        ok >= 1 && overloaded >= 1,
        "ok {ok}, overloaded {overloaded}"
    );
    assert_eq!(ok + overloaded, 12);
}

#[tokio::test]
async fn chat_through_the_engine_is_deterministic_at_temperature_zero() {
    let engine = engine(engine_config(4, 16));
    let app = router(state(&engine));
    let body = json!({
        "model": MODEL, "messages": [{"role": "user", "content": "hello"}],
        "temperature": 0, "max_tokens": 20, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    });
    let (_, _, first) = send(&app, post_json("/v1/chat/completions", &body)).await;
    let (_, _, second) = send(&app, post_json("/v1/chat/completions", &body)).await;
    let text = |bytes: &[u8]| -> String {
        sse_chunks(bytes)
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    };
    assert_eq!(text(&first), text(&second));
    let last = sse_chunks(&second).pop().unwrap();
    assert_eq!(last["usage"]["completion_tokens"], 20);
}
