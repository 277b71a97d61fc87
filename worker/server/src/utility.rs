//! The utility endpoints, shaped as vLLM's: `POST /tokenize`, `POST /detokenize`,
//! `GET /version`.
//!
//! `/tokenize` with `messages` renders the served chat template exactly as
//! `/v1/chat/completions` does, so its `count` is the `prompt_tokens` that request
//! would report. Neither endpoint touches the engine: they answer as soon as the
//! tokenizer is loaded, even while no backend is ready (a frontend without decode
//! workers), and refuse only while the server drains.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::params;
use super::protocol::{ChatMessageIn, FieldPolicy, Request};
use super::tools::ToolRequest;
use super::{AppState, ServedModel};

#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    /// Must be a string; kept raw so another type gets our message, not serde's.
    prompt: Option<Value>,
    messages: Option<Vec<ChatMessageIn>>,
    /// Rendered with `messages` as a chat request offers them.
    tools: Option<Value>,
    add_generation_prompt: Option<bool>,
    add_special_tokens: Option<bool>,
    return_token_strs: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Option<Value>,
}

/// vLLM's fields these endpoints do not implement are refused by name, as is
/// any other field: a client that sends `chat_template` here must not get an
/// answer that ignored it.
impl Request for TokenizeRequest {
    const FIELDS: FieldPolicy = FieldPolicy {
        ignored: &[],
        not_supported: &[
            "chat_template",
            "chat_template_kwargs",
            "continue_final_message",
            "documents",
            "mm_processor_kwargs",
        ],
    };
}

impl Request for DetokenizeRequest {
    const FIELDS: FieldPolicy = FieldPolicy {
        ignored: &[],
        not_supported: &[],
    };
}

/// vLLM's answer: `token_strs` is null unless `return_token_strs` was set.
#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    pub token_strs: Option<Vec<String>>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    pub prompt: String,
}

#[derive(Debug, Serialize)]
pub struct VersionResponse {
    pub version: &'static str,
    /// The git commit the binary was built from, when the build said
    /// (`TANDEM_GIT_COMMIT` at build time, as the worker image sets it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<&'static str>,
}

/// `GET /version`: the crate version, and the commit when the build recorded it.
pub async fn version() -> Json<VersionResponse> {
    Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION"),
        commit: option_env!("TANDEM_GIT_COMMIT").filter(|c| !c.is_empty()),
    })
}

/// `POST /tokenize`: `{"prompt": str}` or `{"messages": [...]}` to token ids.
pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let model = loaded_model(&state)?;
    let bytes = read_body(body, state.config().max_body_bytes).await?;
    let req: TokenizeRequest = params::parse_body(&headers, &bytes)?;
    if let Some(name) = &req.model {
        params::check_model(name, &state.model_names())?;
    }
    let add_special_tokens = req.add_special_tokens.unwrap_or(true);
    let tokens = match (&req.prompt, &req.messages) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid_param(
                "messages",
                "Give either prompt or messages, not both.",
            ))
        }
        (None, None) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "Give prompt (a string) or messages (a chat conversation) to tokenize.",
            ))
        }
        (Some(prompt), None) => {
            if req.tools.is_some() {
                return Err(ApiError::invalid_param(
                    "tools",
                    "tools apply to messages only, not to a prompt.",
                ));
            }
            if req.add_generation_prompt.is_some() {
                return Err(ApiError::invalid_param(
                    "add_generation_prompt",
                    "add_generation_prompt applies to messages only, not to a prompt.",
                ));
            }
            let text = match prompt {
                Value::String(s) if s.is_empty() => {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        "prompt is empty; give the text to tokenize.",
                    ))
                }
                Value::String(s) => s,
                other => {
                    return Err(ApiError::invalid_param(
                        "prompt",
                        format!("prompt must be a string, got {}.", type_name(other)),
                    ))
                }
            };
            encode(&model, text, add_special_tokens)?
        }
        (None, Some(messages)) => {
            let template = model.chat_template.as_ref().ok_or_else(|| {
                ApiError::invalid_param(
                    "messages",
                    format!(
                        "The model `{}` has no chat template; tokenize a plain prompt instead.",
                        state.model_name()
                    ),
                )
            })?;
            let messages = params::chat_messages(messages)?;
            let tools = ToolRequest::check(req.tools.as_ref(), None, None)?;
            let text = template
                .render_with_tools(
                    &messages,
                    tools.offered(),
                    req.add_generation_prompt.unwrap_or(true),
                )
                .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
            encode(&model, &text, add_special_tokens)?
        }
    };
    let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
        tokens
            .iter()
            .map(|&id| model.tokenizer.id_to_token(id).unwrap_or_default())
            .collect()
    });
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: model.max_model_len,
        tokens,
        token_strs,
    }))
}

/// `POST /detokenize`: `{"tokens": [ids]}` to text, special tokens kept.
pub async fn detokenize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let model = loaded_model(&state)?;
    let bytes = read_body(body, state.config().max_body_bytes).await?;
    let req: DetokenizeRequest = params::parse_body(&headers, &bytes)?;
    if let Some(name) = &req.model {
        params::check_model(name, &state.model_names())?;
    }
    let ids = match &req.tokens {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "tokens",
                "tokens is missing; give an array of token ids.",
            ))
        }
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid_param(
                "tokens",
                "tokens is empty; give at least one token id.",
            ))
        }
        Some(Value::Array(items)) => token_ids(items, &model)?,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "tokens",
                format!(
                    "tokens must be an array of token ids, got {}.",
                    type_name(other)
                ),
            ))
        }
    };
    Ok(Json(DetokenizeResponse {
        prompt: model.tokenizer.decode(&ids, false),
    }))
}

/// The model once its tokenizer is loaded, whether or not a backend is ready.
fn loaded_model(state: &AppState) -> Result<Arc<ServedModel>, ApiError> {
    if state.is_draining() {
        return Err(ApiError::unavailable(
            "The server is shutting down and accepts no new requests.",
        ));
    }
    state
        .model
        .get()
        .cloned()
        .ok_or_else(|| ApiError::unavailable("The model is still loading."))
}

/// Token ids of `text`. With special tokens, exactly what the generation
/// endpoints feed the engine (BOS prepended when the model asks for it and the
/// text does not start with it); without, the text's own tokens only.
fn encode(model: &ServedModel, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, ApiError> {
    let failed = |e: String| ApiError::internal(format!("Tokenizing failed: {e}"));
    if add_special_tokens {
        model
            .tokenizer
            .encode(text)
            .map_err(|e| failed(e.to_string()))
    } else {
        model
            .tokenizer
            .inner()
            .encode(text, false)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|e| failed(e.to_string()))
    }
}

fn token_ids(items: &[Value], model: &ServedModel) -> Result<Vec<u32>, ApiError> {
    let vocab = model.tokenizer.vocab_size() as u64;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_u64() {
            Some(id) if id < vocab => Ok(id as u32),
            Some(id) => Err(ApiError::invalid_param(
                format!("tokens[{i}]"),
                format!("tokens[{i}] is {id}, outside the vocabulary of {vocab} tokens."),
            )),
            None => Err(ApiError::invalid_param(
                format!("tokens[{i}]"),
                format!(
                    "tokens[{i}] must be a token id (an integer from 0 to {}), got {v}.",
                    vocab - 1
                ),
            )),
        })
        .collect()
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let inner = e.into_inner();
        if inner
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ApiError::payload_too_large(limit)
        } else {
            ApiError::bad_request(format!("Could not read the request body: {inner}"))
        }
    })
}
