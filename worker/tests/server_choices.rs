//! Several generations per request against a fake engine: `n`, `best_of`,
//! batched prompts and `echo`, streamed and not; and the sampling and
//! structured-output fields reaching the engine.

mod server_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::{json, Value};
use server_support::*;
use tandem_api::types::{GenerateRequest, Grammar};
use tandem_server::router;

const CONTEXT: usize = 256;
const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";

fn app(fake: FakeInfer) -> (Arc<FakeInfer>, axum::Router) {
    let fake = Arc::new(fake);
    let app = router(state_with(fake.clone(), CONTEXT));
    (fake, app)
}

fn body(base: Value, extra: Value) -> Value {
    let mut body = base;
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn chat(extra: Value) -> Value {
    body(
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}]}),
        extra,
    )
}

fn completion(extra: Value) -> Value {
    body(json!({"model": MODEL, "prompt": "Once upon"}), extra)
}

fn chat_prompt_len() -> usize {
    encode("<|im_start|>user\nSay hello<|im_end|>\n<|im_start|>assistant\n").len()
}

#[tokio::test]
async fn n_gives_n_choices_with_seeds_one_apart_and_usage_counting_the_prompt_once() {
    let (fake, app) = app(FakeInfer::replying(encode("Hello")));
    let (status, body) = send_json(
        &app,
        post_json(CHAT, &chat(json!({"n": 3, "seed": 40, "temperature": 1}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["message"]["content"], "Hello");
        assert_eq!(choice["finish_reason"], "stop");
    }
    let reply_len = encode("Hello").len();
    assert_eq!(body["usage"]["prompt_tokens"], chat_prompt_len());
    assert_eq!(body["usage"]["completion_tokens"], 3 * reply_len);
    let requests = fake.requests.lock().unwrap().clone();
    let seeds: Vec<Option<u64>> = requests.iter().map(|r| r.sampling.seed).collect();
    assert_eq!(seeds, vec![Some(40), Some(41), Some(42)]);
    let ids: Vec<&str> = requests.iter().map(|r| r.id.as_str()).collect();
    assert!(
        ids.iter()
            .all(|id| ids.iter().filter(|x| *x == id).count() == 1),
        "engine request ids are unique: {ids:?}"
    );
}

/// Chunks of every choice, each with its index, each choice's own finish
/// chunk, one usage chunk and one `[DONE]`.
#[tokio::test]
async fn streamed_choices_are_interleaved_by_index() {
    let (_, app) = app(FakeInfer::replying(encode("Hi there")));
    for (path, request) in [
        (CHAT, chat(json!({"n": 2}))),
        (COMPLETIONS, completion(json!({"n": 2}))),
    ] {
        let request = body(
            request,
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        );
        let (status, _, raw) = send(&app, post_json(path, &request)).await;
        assert_eq!(status, StatusCode::OK);
        let chunks = sse_chunks(&raw);
        let (last, rest) = chunks.split_last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(
            last["usage"]["completion_tokens"],
            2 * encode("Hi there").len()
        );
        let mut texts: BTreeMap<u64, String> = BTreeMap::new();
        let mut finishes: BTreeMap<u64, usize> = BTreeMap::new();
        for chunk in rest {
            let choices = chunk["choices"].as_array().unwrap();
            assert_eq!(choices.len(), 1, "one choice per chunk: {chunk}");
            let choice = &choices[0];
            let index = choice["index"].as_u64().unwrap();
            let text = choice["delta"]["content"]
                .as_str()
                .or(choice["text"].as_str())
                .unwrap_or("");
            texts.entry(index).or_default().push_str(text);
            if !choice["finish_reason"].is_null() {
                *finishes.entry(index).or_default() += 1;
            }
        }
        assert_eq!(
            texts,
            BTreeMap::from([(0, "Hi there".into()), (1, "Hi there".into())]),
            "{path}"
        );
        assert_eq!(finishes, BTreeMap::from([(0, 1), (1, 1)]), "{path}");
    }
}

#[tokio::test]
async fn batched_prompts_give_choices_prompt_by_prompt() {
    let (fake, app) = app(FakeInfer::replying(encode("ok")));
    let (status, body) = send_json(
        &app,
        post_json(
            COMPLETIONS,
            &completion(json!({"prompt": ["first", "second one"], "n": 2})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let indices: Vec<u64> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, vec![0, 1, 2, 3]);
    let prompts: Vec<Vec<u32>> = fake
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.prompt.clone())
        .collect();
    let (a, b) = (encode("first"), encode("second one"));
    assert_eq!(prompts, vec![a.clone(), a.clone(), b.clone(), b.clone()]);
    assert_eq!(body["usage"]["prompt_tokens"], a.len() + b.len());

    let (status, body) = send_json(
        &app,
        post_json(
            COMPLETIONS,
            &completion(json!({"prompt": [[72, 105], [33]]})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"].as_array().unwrap().len(), 2);
    let last_two: Vec<Vec<u32>> = fake.requests.lock().unwrap()[4..]
        .iter()
        .map(|r| r.prompt.clone())
        .collect();
    assert_eq!(last_two, vec![vec![72, 105], vec![33]]);
}

#[tokio::test]
async fn echo_prepends_the_prompt_and_its_logprobs() {
    let (fake, app) = app(FakeInfer::replying(encode(" there")));
    let (status, body) = send_json(
        &app,
        post_json(COMPLETIONS, &completion(json!({"echo": true}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["choices"][0]["text"], "Once upon there");
    assert!(body["choices"][0]["logprobs"].is_null());
    assert_eq!(fake.last_request().sampling.prompt_logprobs, None);

    let (status, body) = send_json(
        &app,
        post_json(
            COMPLETIONS,
            &completion(json!({"echo": true, "logprobs": 1})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fake.last_request().sampling.prompt_logprobs, Some(1));
    let choice = &body["choices"][0];
    let text = choice["text"].as_str().unwrap();
    assert_eq!(text, "Once upon there");
    let lp = &choice["logprobs"];
    let prompt_len = encode("Once upon").len();
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.len(), prompt_len + encode(" there").len());
    assert_eq!(tokens.concat(), text);
    // The first prompt token has nothing before it; the others have the engine's values.
    assert!(lp["token_logprobs"][0].is_null());
    assert!(lp["top_logprobs"][0].is_null());
    for i in 1..prompt_len {
        let logprob = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            (logprob + i as f64 / 10.0).abs() < 1e-6,
            "token {i}: {logprob}"
        );
        assert_eq!(lp["top_logprobs"][i].as_object().unwrap().len(), 1);
    }
    assert_eq!(lp["token_logprobs"][prompt_len], -0.5);
    // Every offset is where that token's text starts in `text`.
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    for (token, offset) in tokens.iter().zip(&offsets) {
        assert_eq!(&text[*offset..*offset + token.len()], *token);
    }

    // Streamed: the echo is the choice's first chunk.
    let (status, _, raw) = send(
        &app,
        post_json(
            COMPLETIONS,
            &completion(json!({"echo": true, "logprobs": 0, "stream": true})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chunks = sse_chunks(&raw);
    assert_eq!(chunks[0]["choices"][0]["text"], "Once upon");
    assert_eq!(
        chunks[0]["choices"][0]["logprobs"]["tokens"]
            .as_array()
            .unwrap()
            .len(),
        prompt_len
    );
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(streamed, "Once upon there");
}

/// The fake's token logprob for a request: seed 12 is the most likely.
fn logprob_by_seed(request: &GenerateRequest) -> f32 {
    match request.sampling.seed {
        Some(10) => -1.0,
        Some(11) => -2.0,
        Some(12) => -0.25,
        _ => -3.0,
    }
}

#[tokio::test]
async fn best_of_returns_the_candidates_with_the_highest_cumulative_logprob() {
    let (fake, app) = app(FakeInfer::replying(encode("abc")).with_token_logprob(logprob_by_seed));
    let (status, body) = send_json(
        &app,
        post_json(COMPLETIONS, &completion(json!({"best_of": 3, "seed": 10}))),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(fake.requests.lock().unwrap().len(), 3);
    // Ranking needs the logprobs; the client did not ask to see them.
    assert_eq!(fake.last_request().sampling.logprobs, Some(0));
    assert_eq!(body["choices"].as_array().unwrap().len(), 1);
    assert!(body["choices"][0]["logprobs"].is_null());
    // Every candidate's tokens count.
    assert_eq!(body["usage"]["completion_tokens"], 3 * encode("abc").len());

    let (status, body) = send_json(
        &app,
        post_json(
            COMPLETIONS,
            &completion(json!({"best_of": 3, "n": 2, "seed": 10, "logprobs": 0})),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let firsts: Vec<(u64, f64)> = body["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().unwrap(),
                c["logprobs"]["token_logprobs"][0].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(firsts, vec![(0, -0.25), (1, -1.0)], "best first");
}

#[tokio::test]
async fn a_refused_choice_refuses_the_request_and_cancels_the_admitted_ones() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let (fake, app) = app(FakeInfer::replying(encode("Hello")).with_gate(gate));
    fake.set_admission(Admission::AcceptOnly(2));
    let (status, body) = send_json(&app, post_json(CHAT, &chat(json!({"n": 3})))).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let admitted: Vec<String> = fake
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.id.clone())
        .collect();
    assert_eq!(admitted.len(), 2);
    let mut cancelled = fake.cancelled_ids();
    cancelled.sort();
    assert_eq!(cancelled, admitted);
}

#[tokio::test]
async fn sampling_and_structured_output_fields_reach_the_engine() {
    let (fake, app) = app(FakeInfer::replying(encode("{}")));
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let (status, body) = send_json(
        &app,
        post_json(
            CHAT,
            &chat(json!({
                "min_p": 0.1, "repetition_penalty": 1.2, "logit_bias": {"72": 50, "10": -100},
                "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
            })),
        ),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let sampling = fake.last_request().sampling;
    assert_eq!(sampling.min_p, 0.1);
    assert_eq!(sampling.repetition_penalty, 1.2);
    assert_eq!(sampling.logit_bias, vec![(10, -100.0), (72, 50.0)]);
    let Some(Grammar::JsonSchema(text)) = sampling.grammar else {
        panic!("expected a JSON schema grammar, got {:?}", sampling.grammar)
    };
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), schema);

    for (field, grammar) in [
        (
            json!({"response_format": {"type": "json_object"}}),
            Grammar::JsonObject,
        ),
        (
            json!({"guided_regex": "[0-9]+"}),
            Grammar::Regex("[0-9]+".into()),
        ),
        (
            json!({"guided_grammar": "start: \"x\""}),
            Grammar::Lark("start: \"x\"".into()),
        ),
        (
            json!({"guided_choice": ["yes", "no"]}),
            Grammar::Lark("start: \"yes\" | \"no\"\n".into()),
        ),
    ] {
        let (status, body) = send_json(&app, post_json(COMPLETIONS, &completion(field))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(fake.last_request().sampling.grammar, Some(grammar));
    }
}

/// A streamed answer that is a tool call: the call arrives as `tool_calls`
/// deltas and every generated token's logprob reaches the client, those of
/// the call's markup (held back by the parser, never sent as text) included.
#[tokio::test]
async fn a_streamed_tool_call_keeps_every_tokens_logprob() {
    let reply =
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"UTC\"}}\n</tool_call>";
    // The tools' instructions make a long prompt: a context to hold it.
    let app = router(state_with(
        Arc::new(FakeInfer::replying(encode(reply))),
        2048,
    ));
    let request = chat(json!({
        "stream": true, "logprobs": true,
        "tools": [{"type": "function", "function": {"name": "get_time", "parameters":
            {"type": "object", "properties": {"zone": {"type": "string"}}}}}]
    }));
    let (status, _, raw) = send(&app, post_json(CHAT, &request)).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&raw));
    let chunks = sse_chunks(&raw);
    let (mut logprobs, mut arguments, mut name, mut finish) = (0, String::new(), None, None);
    for chunk in &chunks {
        let choice = &chunk["choices"][0];
        if let Some(content) = choice["logprobs"]["content"].as_array() {
            logprobs += content.len();
        }
        assert!(
            choice["delta"]["content"].as_str().unwrap_or("").is_empty(),
            "no text: {chunk}"
        );
        for call in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(n) = call["function"]["name"].as_str() {
                name = Some(n.to_string());
            }
            arguments.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(name.as_deref(), Some("get_time"));
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).unwrap(),
        json!({"zone": "UTC"})
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(logprobs, encode(reply).len());
}
