//! vLLM's utility endpoints on the OpenAI server: `/tokenize` (a prompt, or
//! messages through the chat template), `/detokenize`, `/version`, and their
//! 400s naming the field at fault.

mod server_support;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use server_support::*;
use tandem_api::infer::{GenerateStream, Infer, InferError};
use tandem_api::types::GenerateRequest;
use tandem_model::{ChatTemplate, Tokenizer};
use tandem_server::{router, AppState, ServedModel, ServerConfig};

const CONTEXT: usize = 128;

fn app() -> (Arc<FakeInfer>, axum::Router) {
    let fake = Arc::new(FakeInfer::replying(encode("ok")));
    (fake.clone(), router(state_with(fake, CONTEXT)))
}

/// A server whose tokenizer prepends BOS (256, ChatML's `<|im_start|>`), as
/// Llama's and many GGUF tokenizers do.
fn app_adding_bos() -> axum::Router {
    let plain = tokenizer();
    let tokenizer = Tokenizer::new(plain.inner().clone(), Some(BOS), vec![EOS], true);
    let template = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
    router(AppState::with_model(
        ServerConfig::new(MODEL),
        ServedModel {
            infer: Arc::new(FakeInfer::replying(encode("ok"))),
            tokenizer,
            chat_template: Some(template),
            max_model_len: CONTEXT,
        },
    ))
}

async fn tokenize(app: &axum::Router, body: Value) -> (StatusCode, Value) {
    send_json(app, post_json("/tokenize", &body)).await
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test]
async fn a_prompt_is_tokenized_with_counts_and_optional_token_strings() {
    let (_, app) = app();
    let (status, body) = tokenize(&app, json!({"model": MODEL, "prompt": "Hello world"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tokens = ids(&body["tokens"]);
    assert_eq!(tokens, encode("Hello world"));
    assert_eq!(body["count"], tokens.len());
    assert_eq!(body["max_model_len"], CONTEXT);
    assert!(body["token_strs"].is_null(), "{body}");

    // The vocabulary's own pieces, merges and byte-level space marker included.
    let (status, body) = tokenize(
        &app,
        json!({"prompt": "Hello world", "return_token_strs": true}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["token_strs"],
        json!(["Hell", "o", "Ġw", "or", "l", "d"]),
        "{body}"
    );
    assert_eq!(ids(&body["tokens"]), tokens);
}

#[tokio::test]
async fn messages_tokenize_to_exactly_the_prompt_a_chat_request_sends() {
    let (fake, app) = app();
    let messages = json!([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]}
    ]);
    let (status, body) = tokenize(&app, json!({"model": MODEL, "messages": messages})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let tokens = ids(&body["tokens"]);

    let (status, chat) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": messages, "max_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert_eq!(fake.last_request().prompt, tokens);
    assert_eq!(chat["usage"]["prompt_tokens"], body["count"]);

    // Without the generation prompt the assistant header is not there.
    let (status, body) = tokenize(
        &app,
        json!({"messages": messages, "add_generation_prompt": false}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        ids(&body["tokens"]),
        encode(
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello\nworld<|im_end|>\n"
        )
    );
}

/// With `tools`, the prompt is the one a chat request offering them sends.
#[tokio::test]
async fn messages_with_tools_tokenize_to_the_prompt_a_chat_request_with_tools_sends() {
    // The tools' instructions make a long prompt: a context to hold it.
    let fake = Arc::new(FakeInfer::replying(encode("ok")));
    let app = router(state_with(fake.clone(), 2048));
    let messages = json!([{"role": "user", "content": "What time is it?"}]);
    let tools = json!([{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]);
    let (status, body) = tokenize(&app, json!({"messages": messages, "tools": tools})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, chat) = send_json(
        &app,
        post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 1}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{chat}");
    assert_eq!(fake.last_request().prompt, ids(&body["tokens"]));
    let (_, plain) = tokenize(&app, json!({"messages": messages})).await;
    assert!(
        plain["count"].as_u64() < body["count"].as_u64(),
        "the tools are rendered: {body}"
    );
}

#[tokio::test]
async fn add_special_tokens_decides_the_bos_and_never_doubles_it() {
    let app = app_adding_bos();
    let text_ids = encode("Hi");
    let (_, body) = tokenize(&app, json!({"prompt": "Hi"})).await;
    assert_eq!(ids(&body["tokens"]), [&[BOS][..], &text_ids].concat());
    let (_, body) = tokenize(&app, json!({"prompt": "Hi", "add_special_tokens": false})).await;
    assert_eq!(ids(&body["tokens"]), text_ids);
    // The template already starts with BOS: it is not added a second time.
    let (_, body) = tokenize(
        &app,
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    let tokens = ids(&body["tokens"]);
    assert_eq!(tokens[0], BOS);
    assert_ne!(tokens[1], BOS, "{tokens:?}");
    assert_eq!(
        tokens,
        encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    );
}

#[tokio::test]
async fn detokenize_inverts_tokenize_and_keeps_special_tokens() {
    let (_, app) = app();
    let text = "Hello wörld, ünïcode";
    let (_, body) = tokenize(&app, json!({"prompt": text})).await;
    let (status, back) = send_json(
        &app,
        post_json(
            "/detokenize",
            &json!({"model": MODEL, "tokens": body["tokens"]}),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!(back, json!({"prompt": text}));

    let tokens: Vec<u32> = [&[BOS][..], &encode("Hi"), &[EOS]].concat();
    let (status, back) =
        send_json(&app, post_json("/detokenize", &json!({"tokens": tokens}))).await;
    assert_eq!(status, StatusCode::OK, "{back}");
    assert_eq!(back["prompt"], "<|im_start|>Hi<|im_end|>");
}

#[tokio::test]
async fn version_names_the_build() {
    let (_, app) = app();
    let (status, body) = send_json(&app, get("/version")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["version"], env!("CARGO_PKG_VERSION"));
    let (status, _) = send_json(&app, post_json("/version", &json!({}))).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

/// Each bad body: the status, the `param` named, and words of the message.
#[tokio::test]
async fn bad_input_is_a_400_naming_the_field() {
    let (fake, app) = app();
    let vocab = tokenizer().vocab_size();
    let cases: Vec<(&str, Value, StatusCode, Option<&str>, &str)> = vec![
        (
            "/tokenize",
            json!({}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "Give prompt",
        ),
        (
            "/tokenize",
            json!({"prompt": ""}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "empty",
        ),
        (
            "/tokenize",
            json!({"prompt": 5}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "must be a string",
        ),
        (
            "/tokenize",
            json!({"prompt": ["a"]}),
            StatusCode::BAD_REQUEST,
            Some("prompt"),
            "must be a string",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            "not both",
        ),
        (
            "/tokenize",
            json!({"messages": []}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            "at least one",
        ),
        (
            "/tokenize",
            json!({"messages": "hi"}),
            StatusCode::BAD_REQUEST,
            Some("messages"),
            "invalid type",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "robot", "content": "b"}]}),
            StatusCode::BAD_REQUEST,
            Some("messages[0].role"),
            "robot",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "add_special_tokens": "yes"}),
            StatusCode::BAD_REQUEST,
            Some("add_special_tokens"),
            "invalid type",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "add_generation_prompt": true}),
            StatusCode::BAD_REQUEST,
            Some("add_generation_prompt"),
            "messages only",
        ),
        (
            "/tokenize",
            json!({"prompt": "a", "tools": []}),
            StatusCode::BAD_REQUEST,
            Some("tools"),
            "messages only",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "b"}], "tools": [{"type": "web"}]}),
            StatusCode::BAD_REQUEST,
            Some("tools[0].type"),
            "only `function`",
        ),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "b"}], "chat_template": "{{ x }}"}),
            StatusCode::BAD_REQUEST,
            Some("chat_template"),
            "not supported",
        ),
        (
            "/tokenize",
            json!({"model": "other", "prompt": "a"}),
            StatusCode::NOT_FOUND,
            Some("model"),
            "does not exist",
        ),
        (
            "/detokenize",
            json!({}),
            StatusCode::BAD_REQUEST,
            Some("tokens"),
            "missing",
        ),
        (
            "/detokenize",
            json!({"tokens": []}),
            StatusCode::BAD_REQUEST,
            Some("tokens"),
            "empty",
        ),
        (
            "/detokenize",
            json!({"tokens": "12"}),
            StatusCode::BAD_REQUEST,
            Some("tokens"),
            "array of token ids",
        ),
        (
            "/detokenize",
            json!({"tokens": [1, vocab]}),
            StatusCode::BAD_REQUEST,
            Some("tokens[1]"),
            "outside the vocabulary",
        ),
        (
            "/detokenize",
            json!({"tokens": [1, -3]}),
            StatusCode::BAD_REQUEST,
            Some("tokens[1]"),
            "token id",
        ),
        (
            "/detokenize",
            json!({"tokens": [1.5]}),
            StatusCode::BAD_REQUEST,
            Some("tokens[0]"),
            "token id",
        ),
        (
            "/detokenize",
            json!({"tokens": [1], "skip_special_tokens": true}),
            StatusCode::BAD_REQUEST,
            Some("skip_special_tokens"),
            "Unknown field",
        ),
        (
            "/detokenize",
            json!({"model": "other", "tokens": [1]}),
            StatusCode::NOT_FOUND,
            Some("model"),
            "does not exist",
        ),
    ];
    for (path, body, status, param, message) in cases {
        let (got, answer) = send_json(&app, post_json(path, &body)).await;
        let error = &answer["error"];
        assert_eq!(got, status, "{path} {body}: {answer}");
        assert_eq!(error["param"].as_str(), param, "{path} {body}: {answer}");
        let text = error["message"].as_str().unwrap();
        assert!(text.contains(message), "{path} {body}: {text}");
    }
    // Not JSON at all.
    let request = Request::post("/tokenize")
        .header(header::CONTENT_TYPE, "text/plain")
        .body(axum::body::Body::from("Hello"))
        .unwrap();
    let (status, _) = send_json(&app, request).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(fake.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn messages_need_a_chat_template() {
    let state = AppState::with_model(
        ServerConfig::new(MODEL),
        ServedModel {
            infer: Arc::new(FakeInfer::replying(vec![])),
            tokenizer: tokenizer(),
            chat_template: None,
            max_model_len: CONTEXT,
        },
    );
    let app = router(state);
    let (status, body) = tokenize(
        &app,
        json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no chat template"));
    let (status, _) = tokenize(&app, json!({"prompt": "x"})).await;
    assert_eq!(status, StatusCode::OK);
}

/// A backend that never becomes ready: a frontend with no decode worker yet.
struct NeverReady;

impl Infer for NeverReady {
    fn generate(&self, _: GenerateRequest) -> Result<GenerateStream, InferError> {
        Err(InferError::Unavailable("no decode worker".into()))
    }

    fn is_ready(&self) -> bool {
        false
    }
}

#[tokio::test]
async fn tokenizing_needs_the_tokenizer_not_a_ready_backend() {
    let mut config = ServerConfig::new(MODEL);
    config.shutdown_grace = Duration::from_secs(1);
    let state = AppState::new(config);
    let app = router(state.clone());
    let (status, body) = tokenize(&app, json!({"prompt": "Hi"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("loading"));
    // /version needs nothing loaded.
    let (status, _) = send_json(&app, get("/version")).await;
    assert_eq!(status, StatusCode::OK);

    state.set_model(ServedModel {
        infer: Arc::new(NeverReady),
        tokenizer: tokenizer(),
        chat_template: None,
        max_model_len: CONTEXT,
    });
    let (status, _) = send_json(&app, get("/health")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, body) = tokenize(&app, json!({"prompt": "Hi"})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = send_json(&app, post_json("/detokenize", &json!({"tokens": [1]}))).await;
    assert_eq!(status, StatusCode::OK);

    state.begin_draining();
    let (status, _) = tokenize(&app, json!({"prompt": "Hi"})).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn a_hub_name_with_a_slash_is_a_model_path() {
    let state = AppState::with_model(
        ServerConfig::new("org/tiny"),
        ServedModel {
            infer: Arc::new(FakeInfer::replying(vec![])),
            tokenizer: tokenizer(),
            chat_template: None,
            max_model_len: CONTEXT,
        },
    );
    let app = router(state);
    let (status, body) = send_json(&app, get("/v1/models/org/tiny")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["id"], "org/tiny");
    let (status, body) = send_json(&app, get("/v1/models/org/other")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, _) = tokenize(&app, json!({"model": "org/tiny", "prompt": "x"})).await;
    assert_eq!(status, StatusCode::OK);
}
