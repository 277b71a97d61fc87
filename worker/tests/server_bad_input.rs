//! Every malformed request gets a 4xx with an OpenAI-style error body naming
//! the problem, the engine never sees it, and the server stays healthy.

mod server_support;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use server_support::*;
use tandem_server::router;

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
/// Small, so "longer than the context" is cheap to write.
const CONTEXT: usize = 64;

struct Case {
    name: &'static str,
    request: Request<Body>,
    status: StatusCode,
    /// The `param` the error must name (`None`: no check).
    param: Option<&'static str>,
    /// Text the message must contain (case-insensitive).
    message: &'static str,
}

fn raw(path: &str, content_type: Option<&str>, body: impl Into<Body>) -> Request<Body> {
    let mut b = Request::post(path);
    if let Some(ct) = content_type {
        b = b.header(header::CONTENT_TYPE, ct);
    }
    b.body(body.into()).unwrap()
}

fn chat(extra: Value) -> Request<Body> {
    let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]});
    merge(&mut body, extra);
    post_json(CHAT, &body)
}

fn completion(extra: Value) -> Request<Body> {
    let mut body = json!({"model": MODEL, "prompt": "hi"});
    merge(&mut body, extra);
    post_json(COMPLETIONS, &body)
}

/// Overlay `extra`'s fields on `body`; a null in `extra` removes the field.
fn merge(body: &mut Value, extra: Value) {
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            body.as_object_mut().unwrap().remove(k);
        } else {
            body[k] = v.clone();
        }
    }
}

fn case(
    name: &'static str,
    request: Request<Body>,
    status: u16,
    param: Option<&'static str>,
    message: &'static str,
) -> Case {
    Case {
        name,
        request,
        status: StatusCode::from_u16(status).unwrap(),
        param,
        message,
    }
}

fn cases() -> Vec<Case> {
    let long_text = "x".repeat(200);
    vec![
        // The body itself.
        case(
            "invalid JSON",
            raw(CHAT, Some("application/json"), "{\"model\":"),
            400,
            None,
            "not valid JSON",
        ),
        case(
            "array body",
            raw(CHAT, Some("application/json"), "[1, 2]"),
            400,
            None,
            "must be a JSON object",
        ),
        case(
            "string body",
            raw(CHAT, Some("application/json"), "\"hi\""),
            400,
            None,
            "must be a JSON object",
        ),
        case(
            "empty body",
            raw(CHAT, Some("application/json"), ""),
            400,
            None,
            "empty",
        ),
        case(
            "wrong content type",
            raw(CHAT, Some("text/plain"), "{}"),
            415,
            None,
            "application/json",
        ),
        case(
            "missing content type",
            raw(CHAT, None, "{}"),
            415,
            None,
            "application/json",
        ),
        case(
            "invalid UTF-8",
            raw(
                CHAT,
                Some("application/json"),
                b"{\"model\": \"\xff\xfe\"}".to_vec(),
            ),
            400,
            None,
            "UTF-8",
        ),
        case(
            "body too large",
            raw(
                COMPLETIONS,
                Some("application/json"),
                vec![b' '; 5 * 1024 * 1024],
            ),
            413,
            None,
            "larger than the limit",
        ),
        // Messages.
        case(
            "missing messages",
            chat(json!({"messages": null})),
            400,
            Some("messages"),
            "messages",
        ),
        case(
            "empty messages",
            chat(json!({"messages": []})),
            400,
            Some("messages"),
            "at least one",
        ),
        case(
            "messages not an array",
            chat(json!({"messages": "hi"})),
            400,
            Some("messages"),
            "invalid type",
        ),
        case(
            "unknown role",
            chat(json!({"messages": [{"role": "wizard", "content": "hi"}]})),
            400,
            Some("messages[0].role"),
            "wizard",
        ),
        case(
            "missing role",
            chat(json!({"messages": [{"content": "hi"}]})),
            400,
            Some("messages[0]"),
            "role",
        ),
        case(
            "content of wrong type",
            chat(json!({"messages": [{"role": "user", "content": 42}]})),
            400,
            Some("messages[0].content"),
            "string or an array of text parts",
        ),
        case(
            "image content part",
            chat(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            ),
            400,
            Some("messages[0].content[0].type"),
            "image_url",
        ),
        case(
            "user message without content",
            chat(json!({"messages": [{"role": "user"}]})),
            400,
            Some("messages[0].content"),
            "needs content",
        ),
        // Model.
        case(
            "unknown model",
            chat(json!({"model": "gpt-9"})),
            404,
            Some("model"),
            "gpt-9",
        ),
        case(
            "missing model",
            chat(json!({"model": null})),
            400,
            Some("model"),
            "model",
        ),
        // Lengths.
        case(
            "max_tokens zero",
            chat(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
            "at least 1",
        ),
        case(
            "max_tokens negative",
            chat(json!({"max_tokens": -5})),
            400,
            Some("max_tokens"),
            "at least 1",
        ),
        case(
            "max_tokens a string",
            chat(json!({"max_tokens": "ten"})),
            400,
            Some("max_tokens"),
            "invalid type",
        ),
        case(
            "max_tokens a float",
            chat(json!({"max_tokens": 1.5})),
            400,
            Some("max_tokens"),
            "invalid type",
        ),
        case(
            "max_tokens beyond the context",
            chat(json!({"max_tokens": 1000})),
            400,
            Some("max_tokens"),
            "maximum context length is 64",
        ),
        case(
            "max_completion_tokens zero",
            chat(json!({"max_completion_tokens": 0})),
            400,
            Some("max_completion_tokens"),
            "at least 1",
        ),
        case(
            "prompt longer than the context",
            chat(json!({"messages": [{"role": "user", "content": long_text.clone()}]})),
            400,
            Some("messages"),
            "no room to generate",
        ),
        // Sampling.
        case(
            "negative temperature",
            chat(json!({"temperature": -0.1})),
            400,
            Some("temperature"),
            "between 0 and 2",
        ),
        case(
            "temperature above 2",
            chat(json!({"temperature": 2.5})),
            400,
            Some("temperature"),
            "between 0 and 2",
        ),
        case(
            "temperature a string",
            chat(json!({"temperature": "hot"})),
            400,
            Some("temperature"),
            "invalid type",
        ),
        case(
            "top_p zero",
            chat(json!({"top_p": 0})),
            400,
            Some("top_p"),
            "(0, 1]",
        ),
        case(
            "top_p above one",
            chat(json!({"top_p": 1.5})),
            400,
            Some("top_p"),
            "(0, 1]",
        ),
        case(
            "top_k negative",
            chat(json!({"top_k": -3})),
            400,
            Some("top_k"),
            "top_k",
        ),
        case(
            "n above 16",
            chat(json!({"n": 17})),
            400,
            Some("n"),
            "between 1 and 16",
        ),
        case(
            "n zero",
            completion(json!({"n": 0})),
            400,
            Some("n"),
            "n must",
        ),
        case(
            "min_p above one",
            chat(json!({"min_p": 1.5})),
            400,
            Some("min_p"),
            "between 0 and 1",
        ),
        case(
            "repetition_penalty zero",
            completion(json!({"repetition_penalty": 0})),
            400,
            Some("repetition_penalty"),
            "greater than 0",
        ),
        case(
            "logit_bias out of range",
            chat(json!({"logit_bias": {"5": 150}})),
            400,
            Some("logit_bias"),
            "between -100 and 100",
        ),
        case(
            "logit_bias key not a token id",
            completion(json!({"logit_bias": {"hello": 1}})),
            400,
            Some("logit_bias"),
            "not a token id",
        ),
        case(
            "logit_bias outside the vocabulary",
            chat(json!({"logit_bias": {"999999": 1}})),
            400,
            Some("logit_bias"),
            "vocabulary",
        ),
        case(
            "response_format of an unknown type",
            chat(json!({"response_format": {"type": "xml"}})),
            400,
            Some("response_format.type"),
            "json_schema",
        ),
        case(
            "json_schema without a schema",
            chat(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})),
            400,
            Some("response_format.json_schema.schema"),
            "missing",
        ),
        case(
            "two output constraints",
            completion(json!({"response_format": {"type": "json_object"}, "guided_regex": "a+"})),
            400,
            Some("guided_regex"),
            "only one",
        ),
        case(
            "guided_choice empty",
            chat(json!({"guided_choice": []})),
            400,
            Some("guided_choice"),
            "at least one",
        ),
        case(
            "unknown field",
            chat(json!({"temprature": 0.5})),
            400,
            Some("temprature"),
            "unknown field `temprature`",
        ),
        case(
            "unknown field on completions",
            completion(json!({"messages": []})),
            400,
            Some("messages"),
            "unknown field",
        ),
        case(
            "an OpenAI field this server does not implement",
            chat(json!({"modalities": ["text", "audio"]})),
            400,
            Some("modalities"),
            "not supported by this server",
        ),
        case(
            "presence_penalty out of range",
            chat(json!({"presence_penalty": 3})),
            400,
            Some("presence_penalty"),
            "between -2 and 2",
        ),
        case(
            "frequency_penalty out of range",
            chat(json!({"frequency_penalty": -2.5})),
            400,
            Some("frequency_penalty"),
            "between -2 and 2",
        ),
        case(
            "seed a string",
            chat(json!({"seed": "abc"})),
            400,
            Some("seed"),
            "invalid type",
        ),
        case(
            "stop a number",
            chat(json!({"stop": 5})),
            400,
            Some("stop"),
            "string or an array",
        ),
        case(
            "stop array with a number",
            chat(json!({"stop": ["a", 1]})),
            400,
            Some("stop[1]"),
            "must be a string",
        ),
        case(
            "empty stop string",
            chat(json!({"stop": ""})),
            400,
            Some("stop"),
            "must not be empty",
        ),
        case(
            "too many top_logprobs",
            chat(json!({"logprobs": true, "top_logprobs": 30})),
            400,
            Some("top_logprobs"),
            "between 0 and 20",
        ),
        case(
            "top_logprobs without logprobs",
            chat(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
            "requires logprobs",
        ),
        case(
            "stream a string",
            chat(json!({"stream": "yes"})),
            400,
            Some("stream"),
            "invalid type",
        ),
        case(
            "stream_options without stream",
            chat(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
            "only allowed when stream",
        ),
        case(
            "a tool of a type other than function",
            chat(json!({"tools": [{"type": "retrieval"}]})),
            400,
            Some("tools[0].type"),
            "only `function` is supported",
        ),
        case(
            "two tools with one name",
            chat(json!({"tools": [
                {"type": "function", "function": {"name": "f"}},
                {"type": "function", "function": {"name": "f"}}
            ]})),
            400,
            Some("tools[1].function.name"),
            "already the name of another tool",
        ),
        case(
            "tool_choice naming a function not in tools",
            chat(json!({
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}}
            })),
            400,
            Some("tool_choice.function.name"),
            "not in tools",
        ),
        case(
            "stop_token_ids outside the vocabulary",
            chat(json!({"stop_token_ids": [999999]})),
            400,
            Some("stop_token_ids"),
            "outside the vocabulary",
        ),
        // Completions.
        case(
            "missing prompt",
            completion(json!({"prompt": null})),
            400,
            Some("prompt"),
            "missing",
        ),
        case(
            "prompt a number",
            completion(json!({"prompt": 5})),
            400,
            Some("prompt"),
            "string or an array",
        ),
        case(
            "prompt an empty array",
            completion(json!({"prompt": []})),
            400,
            Some("prompt"),
            "empty array",
        ),
        case(
            "a batch mixing text and token ids",
            completion(json!({"prompt": ["a", [1, 2]]})),
            400,
            Some("prompt[1]"),
            "batch of strings",
        ),
        case(
            "a batch of more than 64 prompts",
            completion(json!({"prompt": vec!["a"; 65]})),
            400,
            Some("prompt"),
            "at most 64",
        ),
        case(
            "an empty prompt in a batch",
            completion(json!({"prompt": ["a", ""]})),
            400,
            Some("prompt[1]"),
            "empty",
        ),
        case(
            "token id outside the vocabulary",
            completion(json!({"prompt": [1, 999999]})),
            400,
            Some("prompt[1]"),
            "below the vocabulary size",
        ),
        case(
            "negative token id",
            completion(json!({"prompt": [-1]})),
            400,
            Some("prompt[0]"),
            "below the vocabulary size",
        ),
        case(
            "empty prompt",
            completion(json!({"prompt": ""})),
            400,
            Some("prompt"),
            "empty",
        ),
        case(
            "completion prompt too long",
            completion(json!({"prompt": long_text})),
            400,
            Some("prompt"),
            "no room to generate",
        ),
        case(
            "completion max_tokens beyond context",
            completion(json!({"max_tokens": 63})),
            400,
            Some("max_tokens"),
            "at most 62",
        ),
        case(
            "completion logprobs too many",
            completion(json!({"logprobs": 50})),
            400,
            Some("logprobs"),
            "between 0 and 20",
        ),
        case(
            "suffix",
            completion(json!({"suffix": "the end"})),
            400,
            Some("suffix"),
            "not supported",
        ),
        case(
            "best_of below n",
            completion(json!({"n": 3, "best_of": 2})),
            400,
            Some("best_of"),
            "at least n",
        ),
        case(
            "best_of streamed",
            completion(json!({"best_of": 3, "stream": true})),
            400,
            Some("best_of"),
            "cannot be streamed",
        ),
        case(
            "completion unknown model",
            completion(json!({"model": "other"})),
            404,
            Some("model"),
            "other",
        ),
        // Routes.
        case(
            "unknown route",
            post_json("/v1/embeddings", &json!({})),
            404,
            None,
            "unknown endpoint",
        ),
        case("wrong method", get(CHAT), 405, None, "not allowed"),
    ]
}

#[tokio::test]
async fn every_malformed_request_is_a_4xx_naming_the_problem() {
    let fake = Arc::new(FakeInfer::replying(encode("fine")));
    let app = router(state_with(fake.clone(), CONTEXT));
    let mut failures = Vec::new();
    for mut c in cases() {
        let request = std::mem::replace(&mut c.request, Request::new(Body::empty()));
        let (status, _, body) = send(&app, request).await;
        let parsed: Result<Value, _> = serde_json::from_slice(&body);
        let problem = match parsed {
            Err(e) => Some(format!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )),
            Ok(v) => check_error(&c, status, &v),
        };
        if let Some(p) = problem {
            failures.push(format!("{}: {p}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n")
    );
    assert!(
        fake.requests.lock().unwrap().is_empty(),
        "the engine must not see malformed requests"
    );

    // Still healthy and serving.
    let (status, _) = send_json(&app, get("/health")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send_json(&app, chat(json!({}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "fine");
}

fn check_error(c: &Case, status: StatusCode, v: &Value) -> Option<String> {
    if status != c.status {
        return Some(format!("status {status}, expected {}: {v}", c.status));
    }
    let err = &v["error"];
    let message = err["message"].as_str().unwrap_or("");
    if message.is_empty() || !err["type"].is_string() {
        return Some(format!("error body lacks message/type: {v}"));
    }
    if !err
        .as_object()
        .is_some_and(|o| o.contains_key("param") && o.contains_key("code"))
    {
        return Some(format!("error body lacks param/code keys: {v}"));
    }
    if !message.to_lowercase().contains(&c.message.to_lowercase()) {
        return Some(format!(
            "message {message:?} does not mention {:?}",
            c.message
        ));
    }
    if let Some(param) = c.param {
        if err["param"] != param {
            return Some(format!("param {}, expected {param:?}", err["param"]));
        }
    }
    None
}

#[tokio::test]
async fn unknown_model_has_model_not_found_code() {
    let fake = Arc::new(FakeInfer::replying(encode("x")));
    let app = router(state_with(fake, CONTEXT));
    let (status, body) = send_json(&app, chat(json!({"model": "nope"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["code"], "model_not_found");
}

/// Fields that change nothing a client could observe are accepted; anything
/// unknown is refused (see the cases above), never dropped in silence.
#[tokio::test]
async fn harmless_openai_fields_are_accepted() {
    let fake = Arc::new(FakeInfer::replying(encode("ok")));
    let app = router(state_with(fake, CONTEXT));
    let (status, body) = send_json(
        &app,
        chat(json!({
            "user": "u-1", "metadata": {"a": "1"}, "store": false, "service_tier": "auto",
            "response_format": {"type": "text"}, "tools": [], "functions": null
        })),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "ok");
    let (status, body) = send_json(&app, completion(json!({"user": "u-1"}))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}
