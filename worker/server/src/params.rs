//! Request body → a validated generation plan, or a 4xx naming the problem.
//!
//! Everything a client can get wrong is checked here, before the engine sees
//! the request, so the engine only ever gets requests it can serve.

use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::ApiError;
use super::protocol::{ChatCompletionRequest, ChatMessageIn, CommonFields, CompletionRequest};
use super::ServedModel;
use tandem_api::types::{SamplingParams, StopParams};
use tandem_model::ChatMessage;

/// Most alternatives per token a client may ask for (OpenAI's chat limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// A request checked against the served model, ready to hand to `Infer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopParams,
    /// Text-level stop strings, applied by the HTTP layer.
    pub stop_strings: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Report logprobs with this many alternatives per token.
    pub logprobs: Option<usize>,
}

/// Check the content type and parse the body into `T`; every failure is a 4xx
/// whose `param` names the offending field when serde can tell.
pub fn parse_body<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
    check_json_content_type(headers)?;
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::bad_request(format!(
            "Request body is not valid UTF-8 (invalid byte at offset {}).",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(ApiError::bad_request(
            "Request body is empty; expected a JSON object.",
        ));
    }
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ApiError::bad_request(format!("Request body is not valid JSON: {e}.")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request(format!(
            "Request body must be a JSON object, got {}.",
            json_type_name(&value)
        )));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            // A missing top-level field: serde names it in the message.
            let param = inner
                .strip_prefix("missing field `")
                .and_then(|rest| rest.strip_suffix('`'))
                .map(str::to_string);
            let err = ApiError::bad_request(format!("Invalid request: {inner}."));
            match param {
                Some(p) => err.with_param(p),
                None => err,
            }
        } else {
            ApiError::invalid_param(path.clone(), format!("Invalid `{path}`: {inner}."))
        }
    })
}

fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(ApiError::unsupported_media_type(None));
    };
    let text = value.to_str().unwrap_or("");
    let essence = text
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(ApiError::unsupported_media_type(Some(text)))
    }
}

fn json_type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// 404 unless `requested` is the served model's name or one of its aliases.
pub fn check_model(requested: &str, names: &ModelNames<'_>) -> Result<(), ApiError> {
    if requested == names.name || names.aliases.iter().any(|a| a == requested) {
        Ok(())
    } else {
        Err(ApiError::model_not_found(requested, names.name))
    }
}

/// The names a client may pass as `model`.
#[derive(Debug, Clone, Copy)]
pub struct ModelNames<'a> {
    pub name: &'a str,
    pub aliases: &'a [String],
}

pub fn plan_chat(
    req: &ChatCompletionRequest,
    names: &ModelNames<'_>,
    model: &ServedModel,
    default_max_tokens: usize,
) -> Result<Plan, ApiError> {
    check_model(&req.model, names)?;
    if let Some(tools) = &req.tools {
        let empty = tools.is_null() || tools.as_array().is_some_and(Vec::is_empty);
        if !empty {
            return Err(ApiError::invalid_param(
                "tools",
                "Tool calling is not supported by this server.",
            ));
        }
    }
    if let Some(format) = &req.response_format {
        let kind = format.get("type").and_then(Value::as_str);
        if !format.is_null() && kind != Some("text") {
            return Err(ApiError::invalid_param(
                "response_format",
                "Only response_format {\"type\": \"text\"} is supported.",
            ));
        }
    }
    let logprobs = match (req.logprobs, req.top_logprobs) {
        (Some(true), top) => Some(check_top_logprobs(top.unwrap_or(0), "top_logprobs")?),
        (_, Some(_)) => {
            return Err(ApiError::invalid_param(
                "top_logprobs",
                "top_logprobs requires logprobs to be true.",
            ))
        }
        _ => None,
    };
    // Check the cheap fields before rendering and tokenizing the prompt.
    let partial = check_common(req.common(), req.max_completion_tokens, model)?;

    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(format!(
            "The model `{}` has no chat template; use /v1/completions with a plain prompt.",
            names.name
        ))
    })?;
    let messages = chat_messages(&req.messages)?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let prompt = model
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::internal(format!("Tokenizing the prompt failed: {e}")))?;
    partial.finish(prompt, "messages", model, default_max_tokens, logprobs)
}

pub fn plan_completion(
    req: &CompletionRequest,
    names: &ModelNames<'_>,
    model: &ServedModel,
    default_max_tokens: usize,
) -> Result<Plan, ApiError> {
    check_model(&req.model, names)?;
    if req.echo == Some(true) {
        return Err(ApiError::invalid_param(
            "echo",
            "echo is not supported by this server.",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "suffix is not supported by this server.",
        ));
    }
    if req.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::invalid_param(
            "best_of",
            "Only best_of = 1 is supported.",
        ));
    }
    let logprobs = match req.logprobs {
        Some(k) => Some(check_top_logprobs(k, "logprobs")?),
        None => None,
    };
    let partial = check_common(req.common(), None, model)?;
    let prompt = completion_prompt(req.prompt.as_ref(), model)?;
    partial.finish(prompt, "prompt", model, default_max_tokens, logprobs)
}

fn check_top_logprobs(k: i64, param: &str) -> Result<usize, ApiError> {
    if (0..=MAX_TOP_LOGPROBS).contains(&k) {
        Ok(k as usize)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {k}."),
        ))
    }
}

/// The request checked except for what depends on the prompt's length.
struct PartialPlan {
    sampling: SamplingParams,
    stop_strings: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    requested_max_tokens: Option<(usize, &'static str)>,
    stream: bool,
    include_usage: bool,
}

/// Check the fields every request has and turn them into engine parameters.
/// `max_completion_tokens` (chat only) is the newer name of `max_tokens` and
/// wins when both are given.
fn check_common(
    f: CommonFields<'_>,
    max_completion_tokens: Option<i64>,
    model: &ServedModel,
) -> Result<PartialPlan, ApiError> {
    if let Some(n) = *f.n {
        if n != 1 {
            return Err(ApiError::invalid_param(
                "n",
                format!("Only n = 1 is supported, got n = {n}."),
            ));
        }
    }
    let max_tokens = match (max_completion_tokens, *f.max_tokens) {
        (Some(m), _) => Some((m, "max_completion_tokens")),
        (None, Some(m)) => Some((m, "max_tokens")),
        (None, None) => None,
    };
    let requested_max_tokens = match max_tokens {
        Some((m, param)) if m < 1 => {
            return Err(ApiError::invalid_param(
                param,
                format!("{param} must be at least 1, got {m}."),
            ))
        }
        Some((m, param)) => Some((usize::try_from(m).unwrap_or(usize::MAX), param)),
        None => None,
    };
    let temperature = f.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}."),
        ));
    }
    let top_p = f.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}."),
        ));
    }
    let top_k = match *f.top_k {
        None | Some(0) | Some(-1) => None,
        Some(k) if k > 0 => Some(k as usize),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be positive, or 0 or -1 to disable it, got {k}."),
            ))
        }
    };
    let presence_penalty = check_penalty(*f.presence_penalty, "presence_penalty")?;
    let frequency_penalty = check_penalty(*f.frequency_penalty, "frequency_penalty")?;
    let stop_strings = stop_strings(f.stop.as_ref())?;
    let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
    let vocab = model.tokenizer.vocab_size();
    if let Some(bad) = stop_token_ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid_param(
            "stop_token_ids",
            format!("stop_token_ids holds {bad}, outside the vocabulary of {vocab} tokens."),
        ));
    }
    let stream = f.stream.unwrap_or(false);
    if f.stream_options.is_some() && !stream {
        return Err(ApiError::invalid_param(
            "stream_options",
            "stream_options is only allowed when stream is true.",
        ));
    }
    let include_usage = f
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    Ok(PartialPlan {
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_k,
            top_p: top_p as f32,
            // Negative seeds are valid in OpenAI's schema; keep their bits.
            seed: f.seed.map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            logprobs: None,
            ..SamplingParams::default()
        },
        stop_strings,
        stop_token_ids,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        requested_max_tokens,
        stream,
        include_usage,
    })
}

impl PartialPlan {
    /// Fit the generation into the context now that the prompt is known.
    fn finish(
        self,
        prompt: Vec<u32>,
        prompt_param: &str,
        model: &ServedModel,
        default_max_tokens: usize,
        logprobs: Option<usize>,
    ) -> Result<Plan, ApiError> {
        let context = model.max_model_len;
        let prompt_len = prompt.len();
        if prompt_len == 0 {
            return Err(ApiError::invalid_param(
                prompt_param,
                "The prompt is empty; it must hold at least one token.",
            ));
        }
        if prompt_len >= context {
            return Err(ApiError::invalid_param(
                prompt_param,
                format!(
                    "The prompt is {prompt_len} tokens long, but this model's context is \
                     {context} tokens, which leaves no room to generate."
                ),
            ));
        }
        let room = context - prompt_len;
        let max_tokens = match self.requested_max_tokens {
            Some((m, param)) if m > room => {
                return Err(ApiError::invalid_param(
                    param,
                    format!(
                        "This model's maximum context length is {context} tokens and the \
                         prompt uses {prompt_len}, so {param} may be at most {room}; got {m}."
                    ),
                ))
            }
            Some((m, _)) => m,
            None => room.min(default_max_tokens),
        };
        let mut sampling = self.sampling;
        sampling.logprobs = logprobs;
        Ok(Plan {
            prompt,
            sampling,
            stop: StopParams {
                max_tokens,
                stop_token_ids: self.stop_token_ids,
                ignore_eos: self.ignore_eos,
            },
            stop_strings: self.stop_strings,
            stream: self.stream,
            include_usage: self.include_usage,
            logprobs,
        })
    }
}

fn check_penalty(value: Option<f64>, param: &str) -> Result<f32, ApiError> {
    let v = value.unwrap_or(0.0);
    if (-2.0..=2.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(ApiError::invalid_param(
            param,
            format!("{param} must be between -2 and 2, got {v}."),
        ))
    }
}

fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let strings = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                item.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid_param(
                        format!("stop[{i}]"),
                        format!("stop[{i}] must be a string, got {}.", json_type_name(item)),
                    )
                })
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "stop",
                format!(
                    "stop must be a string or an array of strings, got {}.",
                    json_type_name(other)
                ),
            ))
        }
    };
    if strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop strings must not be empty.",
        ));
    }
    Ok(strings)
}

/// Roles the chat template understands; `developer` is OpenAI's newer name for `system`.
fn template_role(role: &str) -> Option<&'static str> {
    match role {
        "system" | "developer" => Some("system"),
        "user" => Some("user"),
        "assistant" => Some("assistant"),
        _ => None,
    }
}

pub(crate) fn chat_messages(messages: &[ChatMessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "messages must hold at least one message.",
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = template_role(&m.role).ok_or_else(|| {
                ApiError::invalid_param(
                    format!("messages[{i}].role"),
                    format!(
                        "Unknown or unsupported role `{}` in messages[{i}]; expected system, \
                         developer, user or assistant.",
                        m.role
                    ),
                )
            })?;
            let content = message_text(m.content.as_ref(), role, i)?;
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

/// The text of a message: a string, or text parts joined by newlines.
fn message_text(content: Option<&Value>, role: &str, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if role == "assistant" => Ok(String::new()),
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            param.clone(),
            format!("{param} is missing; a {role} message needs content."),
        )),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let part_param = format!("{param}[{j}]");
                let kind = part.get("type").and_then(Value::as_str);
                match (kind, part.get("text")) {
                    (Some("text"), Some(Value::String(t))) => texts.push(t.as_str()),
                    (Some("text"), _) => {
                        return Err(ApiError::invalid_param(
                            format!("{part_param}.text"),
                            format!("{part_param} is a text part without a string `text`."),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(ApiError::invalid_param(
                            format!("{part_param}.type"),
                            format!(
                                "{part_param} has type `{other}`; only `text` parts are supported."
                            ),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::invalid_param(
                            part_param.clone(),
                            format!(
                            "{part_param} must be an object {{\"type\": \"text\", \"text\": ...}}."
                        ),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        Some(other) => Err(ApiError::invalid_param(
            param.clone(),
            format!(
                "{param} must be a string or an array of text parts, got {}.",
                json_type_name(other)
            ),
        )),
    }
}

/// Token ids of a completions `prompt`.
fn completion_prompt(prompt: Option<&Value>, model: &ServedModel) -> Result<Vec<u32>, ApiError> {
    let encode = |text: &str| {
        model
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::internal(format!("Tokenizing the prompt failed: {e}")))
    };
    match prompt {
        None | Some(Value::Null) => Err(ApiError::invalid_param(
            "prompt",
            "prompt is missing; give a string or an array of token ids.",
        )),
        Some(Value::String(s)) => encode(s),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Err(ApiError::invalid_param(
                "prompt",
                "prompt is an empty array.",
            )),
            [Value::String(s)] => encode(s),
            [Value::Array(ids)] => token_ids(ids, model, "prompt[0]"),
            items if items.iter().all(Value::is_string) => Err(ApiError::invalid_param(
                "prompt",
                "Several prompts in one request are not supported; send one request per prompt.",
            )),
            items if items.iter().all(Value::is_array) => Err(ApiError::invalid_param(
                "prompt",
                "Several prompts in one request are not supported; send one request per prompt.",
            )),
            ids => token_ids(ids, model, "prompt"),
        },
        Some(other) => Err(ApiError::invalid_param(
            "prompt",
            format!(
                "prompt must be a string or an array of token ids, got {}.",
                json_type_name(other)
            ),
        )),
    }
}

fn token_ids(items: &[Value], model: &ServedModel, param: &str) -> Result<Vec<u32>, ApiError> {
    let vocab = model.tokenizer.vocab_size() as u64;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_u64() {
            Some(id) if id < vocab => Ok(id as u32),
            _ => Err(ApiError::invalid_param(
                format!("{param}[{i}]"),
                format!(
                    "{param}[{i}] must be a token id below the vocabulary size {vocab}, got {v}."
                ),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn json_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse_body::<CompletionRequest>(
            &json_headers(),
            br#"{"model": "m", "prompt": "x", "max_tokens": "ten"}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("max_tokens"));
        assert!(err.message.contains("invalid type"), "{}", err.message);
    }

    /// The shared fields are declared in each request struct, not flattened
    /// in, so serde_path_to_error still sees their names on both endpoints.
    #[test]
    fn wrong_type_in_a_shared_field_names_it_on_both_endpoints() {
        let body = br#"{"model": "m", "messages": [], "prompt": "x", "top_k": "3"}"#;
        let chat = parse_body::<ChatCompletionRequest>(&json_headers(), body).unwrap_err();
        let completion = parse_body::<CompletionRequest>(&json_headers(), body).unwrap_err();
        for err in [chat, completion] {
            assert_eq!(err.param.as_deref(), Some("top_k"));
            assert!(err.message.contains("invalid type"), "{}", err.message);
        }
    }

    #[test]
    fn missing_top_level_field_is_named() {
        let err =
            parse_body::<ChatCompletionRequest>(&json_headers(), br#"{"model": "m"}"#).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages"));
    }

    #[test]
    fn nested_path_is_named() {
        let err = parse_body::<ChatCompletionRequest>(
            &json_headers(),
            br#"{"model": "m", "messages": [{"role": "user", "content": "hi"}, {"content": "x"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[1]"));
        assert!(err.message.contains("role"), "{}", err.message);
    }

    #[test]
    fn charset_suffix_and_json_subtypes_are_json() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        assert!(check_json_content_type(&h).is_ok());
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(check_json_content_type(&h).is_err());
    }

    #[test]
    fn stop_accepts_string_array_and_null() {
        assert_eq!(stop_strings(Some(&Value::from("a"))).unwrap(), vec!["a"]);
        assert_eq!(
            stop_strings(Some(&serde_json::json!(["a", "b"]))).unwrap(),
            vec!["a", "b"]
        );
        assert!(stop_strings(Some(&Value::Null)).unwrap().is_empty());
        let err = stop_strings(Some(&serde_json::json!(["a", 3]))).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("stop[1]"));
        assert!(stop_strings(Some(&serde_json::json!(""))).is_err());
    }

    #[test]
    fn content_parts_are_joined_and_other_parts_refused() {
        let parts =
            serde_json::json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]);
        assert_eq!(message_text(Some(&parts), "user", 0).unwrap(), "a\nb");
        let image = serde_json::json!([{"type": "image_url", "image_url": {"url": "x"}}]);
        let err = message_text(Some(&image), "user", 2).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[2].content[0].type"));
        let err = message_text(Some(&Value::from(5)), "user", 0).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].content"));
        assert_eq!(message_text(None, "assistant", 0).unwrap(), "");
        assert!(message_text(None, "user", 0).is_err());
    }
}
