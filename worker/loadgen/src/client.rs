//! One streaming OpenAI request, timed chunk by chunk.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use super::stats::RequestRecord;
use super::workload::Prompt;

/// Which OpenAI API the requests go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Endpoint {
    /// `/v1/chat/completions`
    Chat,
    /// `/v1/completions`
    Completions,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "/v1/chat/completions",
            Self::Completions => "/v1/completions",
        }
    }
}

/// The JSON body of one streaming request that must produce exactly
/// `max_tokens` tokens (`ignore_eos`), with usage reported at the end.
pub fn request_body(endpoint: Endpoint, model: &str, prompt: &Prompt, max_tokens: usize) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": 0.0,
    });
    match (endpoint, prompt) {
        (Endpoint::Chat, Prompt::Text(t)) => {
            body["messages"] = json!([{"role": "user", "content": t}]);
        }
        (Endpoint::Chat, Prompt::Messages(m)) => body["messages"] = Value::Array(m.clone()),
        (Endpoint::Completions, Prompt::Text(t)) => body["prompt"] = json!(t),
        (Endpoint::Completions, Prompt::Messages(m)) => {
            // The completions API takes text: join the message contents.
            let text: Vec<&str> = m.iter().filter_map(|m| m["content"].as_str()).collect();
            body["prompt"] = json!(text.join("\n"));
        }
    }
    body
}

/// `body` with `extra`'s fields set over its own.
pub fn with_extra(mut body: Value, extra: &serde_json::Map<String, Value>) -> Value {
    if let Value::Object(map) = &mut body {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Sends `body` to `url` and times the server-sent events it streams back.
/// Never fails: a failure is recorded in the returned record. `run_start` is
/// when the run began (the record keeps its send time relative to it); a
/// request still streaming at `cut_off` is abandoned (its connection dropped,
/// which cancels it on the server) and recorded as an error, with whatever
/// tokens arrived before.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    run_start: Instant,
    cut_off: Option<Instant>,
) -> RequestRecord {
    let start = Instant::now();
    let mut arrivals: Vec<Instant> = Vec::new();
    let mut usage_tokens: Option<usize> = None;
    let stream = stream_events(client, url, body, |event| {
        let now = Instant::now();
        if let Some(e) = event.get("error") {
            return Err(format!("server error in stream: {e}"));
        }
        if let Some(n) = event
            .pointer("/usage/completion_tokens")
            .and_then(Value::as_u64)
        {
            usage_tokens = Some(n as usize);
        }
        let has_content = event["choices"].as_array().is_some_and(|choices| {
            choices.iter().any(|c| {
                let text = c.pointer("/delta/content").or_else(|| c.get("text"));
                text.and_then(Value::as_str).is_some_and(|t| !t.is_empty())
            })
        });
        if has_content {
            arrivals.push(now);
        }
        Ok(())
    });
    let result = match cut_off {
        Some(at) => tokio::time::timeout_at(at.into(), stream)
            .await
            .unwrap_or_else(|_| Err(CUT_OFF.to_string())),
        None => stream.await,
    };
    let error = result.err();
    let e2e = start.elapsed();
    let error = error.or_else(|| {
        arrivals
            .is_empty()
            .then(|| "the stream ended without any content".to_string())
    });
    RequestRecord {
        sent_at: start - run_start,
        ttft: arrivals.first().map(|t| *t - start),
        itls: arrivals.windows(2).map(|w| w[1] - w[0]).collect(),
        e2e,
        output_tokens: usage_tokens.unwrap_or(arrivals.len()),
        error,
    }
}

/// Posts `body` and calls `on_event` with each `data:` JSON payload until
/// `[DONE]` or the end of the stream.
async fn stream_events(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    mut on_event: impl FnMut(&Value) -> Result<(), String>,
) -> Result<(), String> {
    let response = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(200).collect();
        return Err(format!("HTTP {}: {text}", status.as_u16()));
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| format!("stream broken: {}", error_chain(&e)))?;
        buf.extend_from_slice(&chunk);
        while let Some((end, sep)) = find_event_end(&buf) {
            let event: Vec<u8> = buf.drain(..end + sep).collect();
            let event = String::from_utf8_lossy(&event[..end]);
            for line in event.lines() {
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let data = data.trim();
                if data == "[DONE]" {
                    return Ok(());
                }
                let value: Value = serde_json::from_str(data)
                    .map_err(|e| format!("bad JSON in stream ({e}): {data}"))?;
                on_event(&value)?;
            }
        }
    }
    Ok(())
}

/// Where the first event in `buf` ends, and the length of its separator.
fn find_event_end(buf: &[u8]) -> Option<(usize, usize)> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2));
    let crlf = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4));
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The error of a request abandoned at the end of the drain period.
pub const CUT_OFF: &str = "cut off: still streaming when the drain period ended";

/// A generous bound on one request, so a hung server ends the run with errors.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_body_fields_are_set_over_the_generated_ones() {
        let body = request_body(Endpoint::Chat, "m", &Prompt::Text("hi".into()), 8);
        let extra =
            serde_json::json!({"temperature": 0.7, "response_format": {"type": "json_object"}});
        let merged = with_extra(body, extra.as_object().unwrap());
        assert_eq!(merged["temperature"], 0.7);
        assert_eq!(merged["response_format"]["type"], "json_object");
        assert_eq!(merged["max_tokens"], 8);
    }
}
