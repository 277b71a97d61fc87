//! Route handlers: the OpenAI endpoints, models, health and metrics.
//!
//! A generation request goes: readiness → body (size, UTF-8, JSON) → plan
//! (validation, template, tokens) → admission (`Infer::generate`) → response
//! (one JSON, or SSE chunks ending `data: [DONE]`). Any refusal before
//! admission is an `ApiError` answered with its status; after admission the
//! `Generation` records the outcome.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::generate::{record_rejected, Generation, Piece, RequestRecord, TokenLogprob};
use super::params::{self, Plan};
use super::protocol::*;
use super::tools::{self, ToolCallParser, ToolEvent};
use super::{AppState, ServedModel};
use tandem_api::metrics::metrics;
use tandem_api::types::GenerateRequest;

/// Which OpenAI endpoint a generation answers; decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

#[tracing::instrument(skip_all)]
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(state, headers, body, Endpoint::Chat).await
}

#[tracing::instrument(skip_all)]
pub async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(state, headers, body, Endpoint::Completion).await
}

async fn generate(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let arrived = Instant::now();
    match admit(&state, headers, body, endpoint, arrived).await {
        Ok(admitted) => respond(admitted, endpoint).await,
        Err(err) => {
            tracing::debug!(status = %err.status, error = %err.message, "request refused");
            record_rejected(state.model_name(), &err);
            err.into_response()
        }
    }
}

/// A request the engine accepted, with what its response needs.
struct Admitted {
    generation: Generation,
    meta: ResponseMeta,
    stream: bool,
}

async fn admit(
    state: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
    arrived: Instant,
) -> Result<Admitted, ApiError> {
    let model = state.ready_model()?;
    let limits = state.config();
    let bytes = read_body(body, limits.max_body_bytes).await?;
    let name = state.model_name();
    let names = state.model_names();
    let plan = match endpoint {
        Endpoint::Chat => {
            let req: ChatCompletionRequest = params::parse_body(&headers, &bytes)?;
            params::plan_chat(&req, &names, &model, limits.default_max_tokens)?
        }
        Endpoint::Completion => {
            let req: CompletionRequest = params::parse_body(&headers, &bytes)?;
            params::plan_completion(&req, &names, &model, limits.default_max_tokens)?
        }
    };
    let id = new_response_id(endpoint);
    let Plan {
        prompt,
        sampling,
        stop,
        stop_strings,
        stream,
        include_usage,
        logprobs,
        tool_parsing,
    } = plan;
    let prompt_tokens = prompt.len();
    let events = model
        .infer
        .generate(GenerateRequest {
            id: id.clone(),
            prompt,
            sampling,
            stop,
        })
        .map_err(|e| ApiError::from_infer(e, limits.retry_after_secs))?;
    tracing::debug!(request_id = %id, prompt_tokens, stream, "admitted");
    let record = RequestRecord::admitted(name, arrived, prompt_tokens, state.inflight_counter());
    let generation = Generation::new(
        events,
        &model.tokenizer,
        stop_strings,
        logprobs.is_some(),
        prompt_tokens,
        record,
    );
    Ok(Admitted {
        generation,
        meta: ResponseMeta {
            id,
            created: unix_now(),
            model: name.to_string(),
            endpoint,
            include_usage,
            text_offset: 0,
            pending_logprobs: Vec::new(),
            tool_parser: tool_parsing.map(ToolCallParser::new),
        },
        stream,
    })
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

fn new_response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Chat => "chatcmpl",
        Endpoint::Completion => "cmpl",
    };
    format!("{prefix}-{:032x}", rand::random::<u128>())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn respond(admitted: Admitted, endpoint: Endpoint) -> Response {
    let Admitted {
        mut generation,
        meta,
        stream,
    } = admitted;
    if !stream {
        return respond_whole(generation, meta, endpoint).await;
    }
    // Wait for the first piece before sending headers, so a request the
    // engine fails at once still gets a real error status.
    let first = match generation.next_piece().await {
        Some(Piece::Failed(err)) => return err.into_response(),
        Some(piece) => piece,
        None => return ApiError::internal("The generation produced nothing.").into_response(),
    };
    let mut opening = Vec::new();
    if endpoint == Endpoint::Chat {
        opening.push(meta.chat_chunk(
            ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..ChatDelta::default()
            },
            None,
            None,
        ));
    }
    let events = sse_events(generation, meta, first);
    let body = stream::iter(opening).chain(events).map(Ok::<_, Infallible>);
    Sse::new(body).into_response()
}

async fn respond_whole(
    mut generation: Generation,
    meta: ResponseMeta,
    endpoint: Endpoint,
) -> Response {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut offsets = Vec::new();
    let reason = loop {
        match generation.next_piece().await {
            Some(Piece::Delta {
                text: t,
                logprobs: l,
            }) => {
                offsets.extend(std::iter::repeat_n(text.len(), l.len()));
                logprobs.extend(l);
                text.push_str(&t);
            }
            Some(Piece::Finished {
                text: t,
                logprobs: l,
                reason,
            }) => {
                offsets.extend(std::iter::repeat_n(text.len(), l.len()));
                logprobs.extend(l);
                text.push_str(&t);
                break reason;
            }
            Some(Piece::Failed(err)) => return err.into_response(),
            None => return ApiError::internal("The generation produced nothing.").into_response(),
        }
    };
    let usage = Usage::new(
        generation.prompt_tokens,
        generation.cached_tokens,
        generation.completion_tokens,
    );
    let want_logprobs = generation.wants_logprobs();
    match endpoint {
        Endpoint::Chat => {
            let (message, reason) = chat_message(text, meta.tool_parser, reason);
            Json(ChatCompletion {
                id: meta.id,
                object: "chat.completion",
                created: meta.created,
                model: meta.model,
                choices: vec![ChatChoice {
                    index: 0,
                    message,
                    logprobs: want_logprobs.then(|| chat_logprobs(&logprobs)),
                    finish_reason: reason,
                }],
                usage,
                system_fingerprint: None,
            })
            .into_response()
        }
        Endpoint::Completion => Json(Completion {
            id: meta.id,
            object: "text_completion",
            created: meta.created,
            model: meta.model,
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs: want_logprobs.then(|| completion_logprobs(&logprobs, &offsets)),
                finish_reason: Some(reason),
            }],
            usage: Some(Some(usage)),
            system_fingerprint: None,
        })
        .into_response(),
    }
}

/// The answer's message and finish reason: with tool parsing, its calls and
/// the text outside them.
fn chat_message(
    text: String,
    tool_parser: Option<ToolCallParser>,
    reason: &'static str,
) -> (ChatMessageOut, &'static str) {
    let Some(parser) = tool_parser else {
        let message = ChatMessageOut {
            role: "assistant",
            content: Some(text),
            tool_calls: None,
        };
        return (message, reason);
    };
    let parsed = parser.read_whole(&text);
    let reason = tools::finish_reason(!parsed.tool_calls.is_empty(), reason);
    let message = ChatMessageOut {
        role: "assistant",
        content: parsed.content,
        tool_calls: (!parsed.tool_calls.is_empty()).then_some(parsed.tool_calls),
    };
    (message, reason)
}

/// Identity and running state of one response's chunks.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
    /// Bytes of completion text sent so far (completions `text_offset`).
    text_offset: usize,
    /// Logprobs of tokens whose text is still held back.
    pending_logprobs: Vec<TokenLogprob>,
    /// Reads the text for tool calls (chat with tools offered).
    tool_parser: Option<ToolCallParser>,
}

impl ResponseMeta {
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    fn chat_chunk(
        &self,
        delta: ChatDelta,
        logprobs: Option<ChatLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> Event {
        sse_json(&ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChatChunkChoice {
                index: 0,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
            system_fingerprint: None,
        })
    }

    fn completion_chunk(
        &self,
        text: String,
        logprobs: Option<CompletionLogprobs>,
        finish_reason: Option<&'static str>,
    ) -> Event {
        sse_json(&Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices: vec![CompletionChoice {
                index: 0,
                text,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
            system_fingerprint: None,
        })
    }

    /// A chunk carrying `text` and the logprobs of the tokens behind it.
    fn content_chunk(&mut self, text: String, want_logprobs: bool) -> Event {
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        let offsets = vec![self.text_offset; logprobs.len()];
        self.text_offset += text.len();
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(
                ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                },
                want_logprobs.then(|| chat_logprobs(&logprobs)),
                None,
            ),
            Endpoint::Completion => self.completion_chunk(
                text,
                want_logprobs.then(|| completion_logprobs(&logprobs, &offsets)),
                None,
            ),
        }
    }

    /// The chunks for released `text`: one content chunk, or with tool
    /// parsing whatever the parser decided (perhaps nothing yet).
    fn text_chunks(&mut self, text: String, want_logprobs: bool) -> Vec<Event> {
        match self.tool_parser.as_mut() {
            None => vec![self.content_chunk(text, want_logprobs)],
            Some(parser) => {
                let events = parser.push(&text);
                self.tool_event_chunks(events, want_logprobs)
            }
        }
    }

    /// The text the tool parser still holds, decided now that the output ended.
    fn final_tool_chunks(&mut self, want_logprobs: bool) -> Vec<Event> {
        match self.tool_parser.as_mut() {
            None => Vec::new(),
            Some(parser) => {
                let events = parser.finish();
                self.tool_event_chunks(events, want_logprobs)
            }
        }
    }

    fn tool_event_chunks(&mut self, events: Vec<ToolEvent>, want_logprobs: bool) -> Vec<Event> {
        events
            .into_iter()
            .map(|event| {
                let logprobs = std::mem::take(&mut self.pending_logprobs);
                self.chat_chunk(
                    event.into_delta(),
                    want_logprobs.then(|| chat_logprobs(&logprobs)),
                    None,
                )
            })
            .collect()
    }

    /// `tool_calls` instead of `stop` when the answer made calls.
    fn finish_reason(&self, reason: &'static str) -> &'static str {
        let saw_calls = self.tool_parser.as_ref().is_some_and(|p| p.saw_calls());
        tools::finish_reason(saw_calls, reason)
    }

    fn finish_chunk(&self, reason: &'static str) -> Event {
        match self.endpoint {
            Endpoint::Chat => self.chat_chunk(ChatDelta::default(), None, Some(reason)),
            Endpoint::Completion => self.completion_chunk(String::new(), None, Some(reason)),
        }
    }

    /// The extra last chunk of `stream_options.include_usage`: no choices, usage set.
    fn usage_chunk(&self, usage: Usage) -> Event {
        match self.endpoint {
            Endpoint::Chat => sse_json(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
                system_fingerprint: None,
            }),
            Endpoint::Completion => sse_json(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(Some(usage)),
                system_fingerprint: None,
            }),
        }
    }
}

fn sse_json<T: Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).expect("response types serialize"))
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// The SSE events after the opening chunk: one chunk per released text, then
/// the finish chunk, the usage chunk if asked, and `[DONE]`. The stream owns
/// the generation, so a client that disconnects cancels it.
fn sse_events(
    generation: Generation,
    meta: ResponseMeta,
    first: Piece,
) -> impl Stream<Item = Event> + Send + 'static {
    struct Streaming {
        generation: Generation,
        meta: ResponseMeta,
        first: Option<Piece>,
        done: bool,
    }
    let state = Streaming {
        generation,
        meta,
        first: Some(first),
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let piece = match s.first.take() {
            Some(p) => Some(p),
            None => s.generation.next_piece().await,
        };
        let want_logprobs = s.generation.wants_logprobs();
        let events = match piece {
            Some(Piece::Delta { text, logprobs }) => {
                s.meta.pending_logprobs.extend(logprobs);
                if text.is_empty() {
                    Vec::new()
                } else {
                    s.meta.text_chunks(text, want_logprobs)
                }
            }
            Some(Piece::Finished {
                text,
                logprobs,
                reason,
            }) => {
                s.done = true;
                s.meta.pending_logprobs.extend(logprobs);
                let mut events = Vec::new();
                if !text.is_empty() || !s.meta.pending_logprobs.is_empty() {
                    events.extend(s.meta.text_chunks(text, want_logprobs));
                }
                events.extend(s.meta.final_tool_chunks(want_logprobs));
                events.push(s.meta.finish_chunk(s.meta.finish_reason(reason)));
                if s.meta.include_usage {
                    events.push(s.meta.usage_chunk(Usage::new(
                        s.generation.prompt_tokens,
                        s.generation.cached_tokens,
                        s.generation.completion_tokens,
                    )));
                }
                events.push(done_event());
                events
            }
            Some(Piece::Failed(err)) => {
                s.done = true;
                vec![sse_json(&err.body()), done_event()]
            }
            None => {
                s.done = true;
                vec![done_event()]
            }
        };
        Some((stream::iter(events), s))
    })
    .flatten()
}

fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobs {
    ChatLogprobs {
        content: tokens
            .iter()
            .map(|t| ChatTokenLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.token.as_bytes().to_vec(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(token, logprob)| ChatTopLogprob {
                        token: token.clone(),
                        logprob: *logprob,
                        bytes: token.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn completion_logprobs(tokens: &[TokenLogprob], offsets: &[usize]) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.token.clone()).collect(),
        token_logprobs: tokens.iter().map(|t| t.logprob).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| {
                t.top
                    .iter()
                    .map(|(token, lp)| (token.clone(), Value::from(*lp)))
                    .collect()
            })
            .collect(),
        text_offset: offsets.to_vec(),
    }
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<ModelList>, ApiError> {
    let model = state.ready_model()?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![model_card(&state, &model)],
    }))
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(requested): Path<String>,
) -> Result<Json<ModelCard>, ApiError> {
    let model = state.ready_model()?;
    params::check_model(&requested, &state.model_names())?;
    Ok(Json(model_card(&state, &model)))
}

fn model_card(state: &AppState, model: &ServedModel) -> ModelCard {
    ModelCard {
        id: state.model_name().to_string(),
        object: "model",
        created: state.started_unix(),
        owned_by: "tandem",
        max_model_len: model.max_model_len,
    }
}

#[derive(Serialize)]
pub struct HealthBody {
    status: &'static str,
}

/// 200 only when requests can be served: the model is loaded, the backend is
/// ready and the server is not draining for shutdown.
pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let status = state.health();
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(HealthBody { status })).into_response()
}

pub async fn prometheus_metrics() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().render(),
    )
        .into_response()
}

pub async fn unknown_route(method: Method, uri: Uri) -> ApiError {
    ApiError::unknown_route(method.as_str(), uri.path())
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::method_not_allowed(method.as_str(), uri.path())
}
