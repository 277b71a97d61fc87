//! The OpenAI endpoints against a fake engine: response shapes, SSE framing,
//! usage, stop strings, parameters reaching the engine, admission errors.

mod server_support;

use std::sync::Arc;

use axum::http::{header, StatusCode};
use serde_json::{json, Value};
use server_support::*;
use tandem_server::{router, AppState, ServerConfig};

const CONTEXT: usize = 256;

fn app_replying(reply: &str) -> (Arc<FakeInfer>, axum::Router) {
    let fake = Arc::new(FakeInfer::replying(encode(reply)));
    let app = router(state_with(fake.clone(), CONTEXT));
    (fake, app)
}

fn chat_body(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn completion_body(extra: Value) -> Value {
    let mut body = json!({"model": MODEL, "prompt": "Once upon"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Prompt tokens of the chat request built by `chat_body`.
fn chat_prompt_len() -> usize {
    encode("<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n").len()
}

#[tokio::test]
async fn chat_completion_has_openai_shape_and_usage() {
    let (fake, app) = app_replying("Hello world!");
    let (status, body) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], MODEL);
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "Hello world!");
    assert_eq!(choice["finish_reason"], "stop");
    assert!(choice["logprobs"].is_null());
    let prompt_len = chat_prompt_len();
    let reply_len = encode("Hello world!").len();
    assert_eq!(body["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(body["usage"]["completion_tokens"], reply_len);
    assert_eq!(body["usage"]["total_tokens"], prompt_len + reply_len);
    // The engine got the rendered template's tokens.
    let req = fake.last_request();
    assert_eq!(
        req.prompt,
        encode("<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n")
    );
    assert_eq!(
        req.prompt[0], BOS,
        "special tokens in the template become ids"
    );
}

#[tokio::test]
async fn max_tokens_cuts_with_finish_reason_length() {
    let (fake, app) = app_replying("Hello world!");
    let (status, body) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({"max_tokens": 2}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    // "Hell" is one merged token, "o" the next.
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_eq!(fake.last_request().stop.max_tokens, 2);

    // max_completion_tokens is the newer name and wins.
    send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body(json!({"max_tokens": 2, "max_completion_tokens": 3})),
        ),
    )
    .await;
    assert_eq!(fake.last_request().stop.max_tokens, 3);
}

#[tokio::test]
async fn absent_max_tokens_fills_the_context_up_to_the_default_cap() {
    // Small context: the room left is the limit.
    let fake = Arc::new(FakeInfer::replying(encode("x")));
    let app = router(state_with(fake.clone(), 64));
    let (status, _) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(fake.last_request().stop.max_tokens, 64 - chat_prompt_len());

    // Large context: the default cap is the limit.
    let fake = Arc::new(FakeInfer::replying(encode("x")));
    let app = router(state_with(fake.clone(), 100_000));
    send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(
        fake.last_request().stop.max_tokens,
        tandem_server::DEFAULT_MAX_TOKENS
    );
}

#[tokio::test]
async fn sampling_parameters_reach_the_engine() {
    let (fake, app) = app_replying("ok");
    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body(json!({
                "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 1234,
                "presence_penalty": 0.5, "frequency_penalty": -0.25,
                "ignore_eos": true, "stop_token_ids": [5, 7], "max_tokens": 9
            })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let req = fake.last_request();
    assert_eq!(req.sampling.temperature, 0.7);
    assert_eq!(req.sampling.top_p, 0.9);
    assert_eq!(req.sampling.top_k, Some(40));
    assert_eq!(req.sampling.seed, Some(1234));
    assert_eq!(req.sampling.presence_penalty, 0.5);
    assert_eq!(req.sampling.frequency_penalty, -0.25);
    assert_eq!(req.sampling.logprobs, None);
    assert!(req.stop.ignore_eos);
    assert_eq!(req.stop.stop_token_ids, vec![5, 7]);
    assert_eq!(req.stop.max_tokens, 9);

    // Defaults: OpenAI's temperature 1 and top_p 1, no top_k.
    send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    let req = fake.last_request();
    assert_eq!(req.sampling.temperature, 1.0);
    assert_eq!(req.sampling.top_p, 1.0);
    assert_eq!(req.sampling.top_k, None);
    assert_eq!(req.sampling.seed, None);
    assert!(!req.stop.ignore_eos);
}

#[tokio::test]
async fn chat_stream_is_sse_ending_with_done() {
    let (_, app) = app_replying("Hello world!");
    let (status, headers, body) = send(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/event-stream");
    let chunks = sse_chunks(&body);
    let first = &chunks[0];
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let id = first["id"].clone();
    assert!(
        chunks.iter().all(|c| c["id"] == id),
        "one id for every chunk"
    );
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "no usage unless asked"
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "Hello world!");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["choices"][0]["finish_reason"].is_null()));
}

#[tokio::test]
async fn include_usage_adds_a_last_chunk_with_usage_and_no_choices() {
    let (_, app) = app_replying("Hello world!");
    let (status, _, body) = send(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = sse_chunks(&body);
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    let reply_len = encode("Hello world!").len();
    assert_eq!(last["usage"]["completion_tokens"], reply_len);
    assert_eq!(last["usage"]["prompt_tokens"], chat_prompt_len());
    assert_eq!(last["usage"]["total_tokens"], reply_len + chat_prompt_len());
    for c in rest {
        assert!(
            c["usage"].is_null() && c.get("usage").is_some(),
            "usage: null before the end: {c}"
        );
    }
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn completions_non_stream_and_stream() {
    let (fake, app) = app_replying(" there was a dragon.");
    let (status, body) = send_json(
        &app,
        post_json("/v1/completions", &completion_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["choices"][0]["text"], " there was a dragon.");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], encode("Once upon").len());
    assert_eq!(fake.last_request().prompt, encode("Once upon"));

    let (status, _, body) = send(
        &app,
        post_json(
            "/v1/completions",
            &completion_body(json!({"stream": true, "stream_options": {"include_usage": true}})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = sse_chunks(&body);
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, " there was a dragon.");
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        last["usage"]["completion_tokens"],
        encode(" there was a dragon.").len()
    );
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");
}

#[tokio::test]
async fn completion_prompt_as_token_ids() {
    let (fake, app) = app_replying("ok");
    for prompt in [json!([72, 105]), json!([[72, 105]]), json!(["Hi"])] {
        let (status, body) = send_json(
            &app,
            post_json(
                "/v1/completions",
                &completion_body(json!({"prompt": prompt})),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(fake.last_request().prompt, vec![72, 105], "prompt {prompt}");
    }
}

#[tokio::test]
async fn stop_string_split_across_tokens_truncates_and_cancels() {
    // Byte-level tokens: "STOP" is four tokens. The delay keeps the engine
    // generating when the stop string completes.
    let reply = "Hello world! STOP and more text, long enough to still be generating";
    let fake = Arc::new(
        FakeInfer::replying(encode(reply)).with_token_delay(std::time::Duration::from_millis(5)),
    );
    let app = router(state_with(fake.clone(), CONTEXT));
    assert!(encode("STOP").len() > 1);
    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body(json!({"stop": ["STOP", "zzz"]})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello world! ");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    // Tokens up to and including the one completing "STOP" were generated.
    assert_eq!(
        body["usage"]["completion_tokens"],
        encode("Hello world! STOP").len()
    );
    let id = fake.last_request().id;
    assert!(
        eventually(|| fake.cancelled_ids().contains(&id)).await,
        "the engine request is cancelled once the stop string matched"
    );
    let sent = fake.tokens_sent.lock().unwrap()[&id];
    assert!(
        sent < encode(reply).len(),
        "the engine stopped early: {sent} tokens"
    );

    // Streaming: no delta ever shows part of the stop string.
    let (_, _, body) = send(
        &app,
        post_json(
            "/v1/completions",
            &completion_body(json!({"stop": "STOP", "stream": true})),
        ),
    )
    .await;
    let chunks = sse_chunks(&body);
    let deltas: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(deltas.concat(), "Hello world! ");
    assert!(deltas.iter().all(|d| !d.contains('S')), "{deltas:?}");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

#[tokio::test]
async fn text_that_merely_starts_like_a_stop_string_is_released() {
    let (_, app) = app_replying("a STAR is born");
    let (_, _, body) = send(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body(json!({"stop": "STOP", "stream": true})),
        ),
    )
    .await;
    let chunks = sse_chunks(&body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "a STAR is born");
}

#[tokio::test]
async fn streamed_multibyte_text_never_splits_a_character() {
    let reply = "café ☕ 日本語 ok";
    let (_, app) = app_replying(reply);
    let (_, _, body) = send(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    let chunks = sse_chunks(&body);
    let deltas: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(deltas.concat(), reply);
}

#[tokio::test]
async fn logprobs_are_reported_per_token() {
    let (fake, app) = app_replying("Hello");
    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &chat_body(json!({"logprobs": true, "top_logprobs": 2})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fake.last_request().sampling.logprobs, Some(2));
    let content = body["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    assert_eq!(content.len(), encode("Hello").len());
    let tokens: String = content
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens, "Hello");
    assert_eq!(content[0]["logprob"], -0.5);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert_eq!(content[0]["top_logprobs"][1]["logprob"], -2.0);

    let (status, body) = send_json(
        &app,
        post_json("/v1/completions", &completion_body(json!({"logprobs": 1}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let lp = &body["choices"][0]["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        encode("Hello").len()
    );
    assert_eq!(lp["token_logprobs"][0], -0.5);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 1);
    assert_eq!(lp["text_offset"][0], 0);
}

#[tokio::test]
async fn overloaded_is_429_with_retry_after() {
    let (fake, app) = app_replying("x");
    fake.set_admission(Admission::Overloaded);
    let (status, headers, body) = send(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers[header::RETRY_AFTER], "1");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("overloaded"));

    fake.set_admission(Admission::Unavailable);
    let (status, body) = send_json(
        &app,
        post_json("/v1/completions", &completion_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("engine stopped"));
}

#[tokio::test]
async fn engine_failure_is_a_5xx_not_a_hang() {
    let (fake, app) = app_replying("x");
    fake.set_admission(Admission::FailAfterStart);
    let (status, body) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("device lost"));
    // Streaming: the failure comes before any token, so it is still a status.
    let (status, _, _) = send(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({"stream": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
}

#[tokio::test]
async fn models_health_and_metrics() {
    let (_, app) = app_replying("x");
    let (status, body) = send_json(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], MODEL);
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(body["data"][0]["max_model_len"], CONTEXT);
    let (status, body) = send_json(&app, get(&format!("/v1/models/{MODEL}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["id"], MODEL);
    let (status, body) = send_json(&app, get("/v1/models/other")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");

    let (status, body) = send_json(&app, get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");

    send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    let (status, headers, body) = send(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers[header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(body).unwrap();
    for series in [
        "tandem_frontend_requests_total{model=\"test-model\",status=\"ok\"}",
        "tandem_frontend_time_to_first_token_seconds_bucket",
        "tandem_frontend_inter_token_latency_seconds_bucket",
        "tandem_frontend_request_duration_seconds_bucket",
        "tandem_frontend_input_tokens_bucket",
        "tandem_frontend_output_tokens_bucket",
        "tandem_frontend_inflight_requests{model=\"test-model\"}",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
}

#[tokio::test]
async fn the_arrival_series_is_exported_at_zero_before_any_request() {
    // A model name no other test serves: the registry is shared by the whole test binary.
    let state = AppState::new(ServerConfig::new("arrivals-only-model"));
    let app = router(state);
    let (status, _, body) = send(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.contains("tandem_frontend_input_tokens_count{model=\"arrivals-only-model\"} 0"),
        "the planner reads arrivals from this series; absent means no data, not no traffic:\n{text}"
    );
}

#[tokio::test]
async fn not_ready_until_the_model_is_set() {
    let state = AppState::new(ServerConfig::new(MODEL));
    let app = router(state.clone());
    let (status, body) = send_json(&app, get("/health")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "loading");
    let (status, body) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("loading"));
    let (status, _) = send_json(&app, get("/v1/models")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Metrics are served while loading.
    let (status, _, _) = send(&app, get("/metrics")).await;
    assert_eq!(status, StatusCode::OK);

    state.set_model(tandem_server::ServedModel {
        infer: Arc::new(FakeInfer::replying(encode("ready now"))),
        tokenizer: tokenizer(),
        chat_template: Some(tandem_model::ChatTemplate::new(CHATML, "", "").unwrap()),
        max_model_len: CONTEXT,
    });
    let (status, _) = send_json(&app, get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["choices"][0]["message"]["content"], "ready now");
}

#[tokio::test]
async fn base_model_without_template_refuses_chat_but_completes() {
    let fake = Arc::new(FakeInfer::replying(encode("text")));
    let state = AppState::with_model(
        ServerConfig::new(MODEL),
        tandem_server::ServedModel {
            infer: fake,
            tokenizer: tokenizer(),
            chat_template: None,
            max_model_len: CONTEXT,
        },
    );
    let app = router(state);
    let (status, body) = send_json(
        &app,
        post_json("/v1/chat/completions", &chat_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no chat template"));
    let (status, _) = send_json(
        &app,
        post_json("/v1/completions", &completion_body(json!({}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn aliases_are_accepted_as_model_but_not_listed() {
    let mut config = ServerConfig::new(MODEL);
    config.model_aliases = vec!["default".into()];
    let state = AppState::with_model(
        config,
        tandem_server::ServedModel {
            infer: Arc::new(FakeInfer::replying(encode("hi"))),
            tokenizer: tokenizer(),
            chat_template: None,
            max_model_len: CONTEXT,
        },
    );
    let app = router(state);
    let (status, body) = send_json(
        &app,
        post_json(
            "/v1/completions",
            &completion_body(json!({"model": "default"})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model"], MODEL, "responses name the served model");
    let (_, body) = send_json(&app, get("/v1/models")).await;
    assert_eq!(body["data"].as_array().unwrap().len(), 1);
    let (status, _) = send_json(
        &app,
        post_json(
            "/v1/completions",
            &completion_body(json!({"model": "Default"})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
