//! Route handlers: the OpenAI endpoints, models, health and metrics.
//!
//! A generation request goes: readiness → body (size, UTF-8, JSON) → plan
//! (validation, template, tokens) → admission (`Infer::generate`, once per
//! prompt and choice) → response (one JSON, or SSE chunks of every choice
//! interleaved, ending `data: [DONE]`). Any refusal before admission is an
//! `ApiError` answered with its status; after admission each choice's
//! `Generation` records its outcome.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::{join_all, try_join_all};
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;
use serde_json::Value;

use super::error::ApiError;
use super::generate::{
    record_rejected, Generation, Piece, PromptToken, RequestRecord, TokenCounts, TokenLogprob,
};
use super::params::{self, Plan};
use super::protocol::*;
use super::tools::{self, ToolCallParser, ToolEvent, ToolParsing};
use super::{AppState, ServedModel};
use tandem_api::metrics::metrics;
use tandem_telemetry::phases::Phases;

/// Which OpenAI endpoint a generation answers; decides the response shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

// No span of their own: the request's span (`request_context`) names the route, and the
// frontend's relay task takes the current span as the request's.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    generate(state, headers, body, Endpoint::Chat).await
}

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
        Ok(admitted) => respond(admitted).await,
        Err(err) => {
            tracing::debug!(status = %err.status, error = %err.message, "request refused");
            record_rejected(state.model_name(), &err);
            err.into_response()
        }
    }
}

/// A request the engine accepted, with what its response needs.
struct Admitted {
    /// One per engine request, prompt by prompt, `best_of` per prompt.
    runs: Vec<Run>,
    meta: Arc<ResponseMeta>,
    stream: bool,
    /// Choices returned per prompt.
    n: usize,
    /// Candidates generated per prompt; more than `n` means ranking them.
    best_of: usize,
    /// Read each choice's text for tool calls (chat with tools offered).
    tool_parsing: Option<ToolParsing>,
}

/// One engine request of a response: one candidate for one prompt.
struct Run {
    prompt_index: usize,
    /// Its number among its prompt's candidates.
    candidate: usize,
    generation: Generation,
    echo: Option<Echo>,
}

/// What `echo` puts before a choice's text.
struct Echo {
    text: String,
    prompt: Vec<u32>,
}

impl Run {
    /// The choice index of an unranked run: `n` choices per prompt, in order.
    fn index(&self, n: usize) -> u32 {
        (self.prompt_index * n + self.candidate) as u32
    }

    /// The echoed prompt's tokens; only when the client wants logprobs.
    fn echoed_tokens(&self) -> Option<Vec<PromptToken>> {
        let echo = self.echo.as_ref()?;
        self.generation
            .wants_logprobs()
            .then(|| self.generation.echoed_prompt(&echo.prompt, echo.text.len()))
    }
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
    let requests = plan.engine_requests(&id);
    let Plan {
        prompts,
        stop_strings,
        stream,
        include_usage,
        logprobs,
        n,
        best_of,
        tool_parsing,
        ..
    } = plan;
    let mut runs: Vec<Run> = Vec::with_capacity(requests.len());
    for (k, request) in requests.into_iter().enumerate() {
        let prompt_index = k / best_of;
        let echo = prompts[prompt_index].echo.clone().map(|text| Echo {
            text,
            prompt: request.prompt.clone(),
        });
        let prompt_tokens = request.prompt.len();
        let phases = limits.engine_phases.then(|| Phases::start(false)).flatten();
        let events = match model.infer.generate(request) {
            Ok(events) => events,
            Err(e) => {
                // All or nothing: the choices admitted so far are cancelled.
                let err = ApiError::from_infer(e, limits.retry_after_secs);
                for run in runs {
                    run.generation.release(&err);
                }
                return Err(err);
            }
        };
        let record =
            RequestRecord::admitted(name, arrived, prompt_tokens, state.inflight_counter());
        runs.push(Run {
            prompt_index,
            candidate: k % best_of,
            generation: Generation::new(
                events,
                &model.tokenizer,
                stop_strings.clone(),
                logprobs.is_some(),
                prompt_tokens,
                record,
            )
            .with_phases(phases),
            echo,
        });
    }
    tracing::debug!(response_id = %id, engine_requests = runs.len(), stream, "admitted");
    Ok(Admitted {
        runs,
        meta: Arc::new(ResponseMeta {
            id,
            created: unix_now(),
            model: name.to_string(),
            endpoint,
            include_usage,
        }),
        stream,
        n,
        best_of,
        tool_parsing,
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

async fn respond(admitted: Admitted) -> Response {
    let Admitted {
        mut runs,
        meta,
        stream,
        n,
        best_of,
        tool_parsing,
    } = admitted;
    if !stream {
        return respond_whole(runs, &meta, n, best_of, tool_parsing).await;
    }
    // Wait for every choice's first piece before sending headers, so a
    // request the engine fails at once still gets a real error status.
    let firsts = join_all(runs.iter_mut().map(|run| run.generation.next_piece())).await;
    let mut choices = Vec::with_capacity(runs.len());
    let mut opening = Vec::new();
    for (run, first) in runs.into_iter().zip(firsts) {
        let first = match first {
            Some(Piece::Failed(err)) => return err.into_response(),
            Some(piece) => piece,
            None => return ApiError::internal("The generation produced nothing.").into_response(),
        };
        let index = run.index(n);
        let mut text_offset = 0;
        match (meta.endpoint, &run.echo) {
            (Endpoint::Chat, _) => opening.push(meta.chat_chunk(
                index,
                ChatDelta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..ChatDelta::default()
                },
                None,
                None,
            )),
            (Endpoint::Completion, Some(echo)) => {
                let logprobs = run.echoed_tokens().map(|t| echo_logprobs(&t));
                opening.push(meta.completion_chunk(index, echo.text.clone(), logprobs, None));
                text_offset = echo.text.len();
            }
            (Endpoint::Completion, None) => {}
        }
        choices.push(StreamingChoice {
            index,
            candidate: run.candidate,
            generation: run.generation,
            first: Some(first),
            meta: meta.clone(),
            text_offset,
            pending_logprobs: Vec::new(),
            tool_parser: tool_parsing.map(ToolCallParser::new),
        });
    }
    let events = sse_events(choices, meta);
    let body = stream::iter(opening).chain(events).map(Ok::<_, Infallible>);
    Sse::new(body).into_response()
}

/// A run read to its end, before it becomes a choice.
struct FinishedRun {
    prompt_index: usize,
    candidate: usize,
    text: String,
    logprobs: Vec<TokenLogprob>,
    /// Byte offset in `text` of each of `logprobs`' tokens.
    offsets: Vec<usize>,
    reason: &'static str,
    counts: TokenCounts,
    cumulative_logprob: f64,
    wants_logprobs: bool,
    /// The echoed prompt's tokens, when echoing with logprobs.
    echoed_tokens: Option<Vec<PromptToken>>,
}

async fn run_to_end(mut run: Run) -> Result<FinishedRun, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut offsets = Vec::new();
    let mut echoed_tokens = None;
    let mut first = true;
    let reason = loop {
        let piece = run.generation.next_piece().await;
        if std::mem::take(&mut first) {
            // The prompt's logprobs arrive before the first token.
            if let Some(echo) = &run.echo {
                text.push_str(&echo.text);
                echoed_tokens = run.echoed_tokens();
            }
        }
        match piece {
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
            Some(Piece::Failed(err)) => return Err(err),
            None => return Err(ApiError::internal("The generation produced nothing.")),
        }
    };
    Ok(FinishedRun {
        prompt_index: run.prompt_index,
        candidate: run.candidate,
        text,
        logprobs,
        offsets,
        reason,
        counts: run.generation.counts(),
        cumulative_logprob: run.generation.cumulative_logprob,
        wants_logprobs: run.generation.wants_logprobs(),
        echoed_tokens,
    })
}

/// The choices in response order, `n` per prompt: a prompt's candidates as
/// they are, or with `best_of` > `n` the `n` with the highest cumulative
/// logprob, best first.
fn choose(finished: Vec<FinishedRun>, n: usize, best_of: usize) -> Vec<FinishedRun> {
    if best_of == n {
        return finished;
    }
    let mut by_prompt: Vec<Vec<FinishedRun>> = Vec::new();
    for run in finished {
        if by_prompt.len() <= run.prompt_index {
            by_prompt.resize_with(run.prompt_index + 1, Vec::new);
        }
        by_prompt[run.prompt_index].push(run);
    }
    by_prompt
        .into_iter()
        .flat_map(|mut candidates| {
            candidates.sort_by(|a, b| b.cumulative_logprob.total_cmp(&a.cumulative_logprob));
            candidates.truncate(n);
            candidates
        })
        .collect()
}

/// `usage` over every engine request of a response: each prompt counted once
/// (as OpenAI does for `n`), every candidate's generated tokens counted.
#[derive(Debug, Default)]
struct UsageTally {
    prompt_tokens: usize,
    cached_tokens: usize,
    completion_tokens: usize,
}

impl UsageTally {
    fn add(&mut self, candidate: usize, counts: TokenCounts) {
        if candidate == 0 {
            self.prompt_tokens += counts.prompt_tokens;
            self.cached_tokens += counts.cached_tokens;
        }
        self.completion_tokens += counts.completion_tokens;
    }

    fn usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens,
            self.cached_tokens,
            self.completion_tokens,
        )
    }
}

async fn respond_whole(
    runs: Vec<Run>,
    meta: &ResponseMeta,
    n: usize,
    best_of: usize,
    tool_parsing: Option<ToolParsing>,
) -> Response {
    // The first failure answers the request; dropping the others cancels them.
    let finished = match try_join_all(runs.into_iter().map(run_to_end)).await {
        Ok(finished) => finished,
        Err(err) => return err.into_response(),
    };
    let mut tally = UsageTally::default();
    for run in &finished {
        tally.add(run.candidate, run.counts);
    }
    let usage = tally.usage();
    let choices = choose(finished, n, best_of).into_iter().enumerate();
    match meta.endpoint {
        Endpoint::Chat => Json(ChatCompletion {
            id: meta.id.clone(),
            object: "chat.completion",
            created: meta.created,
            model: meta.model.clone(),
            choices: choices
                .map(|(index, run)| {
                    let logprobs = run.wants_logprobs.then(|| chat_logprobs(&run.logprobs));
                    let parser = tool_parsing.map(ToolCallParser::new);
                    let (message, finish_reason) = chat_message(run.text, parser, run.reason);
                    ChatChoice {
                        index: index as u32,
                        logprobs,
                        message,
                        finish_reason,
                    }
                })
                .collect(),
            usage,
            system_fingerprint: None,
        })
        .into_response(),
        Endpoint::Completion => Json(Completion {
            id: meta.id.clone(),
            object: "text_completion",
            created: meta.created,
            model: meta.model.clone(),
            choices: choices
                .map(|(index, run)| {
                    let logprobs = run.wants_logprobs.then(|| {
                        let mut all = run
                            .echoed_tokens
                            .as_deref()
                            .map(echo_logprobs)
                            .unwrap_or_default();
                        append_logprobs(&mut all, completion_logprobs(&run.logprobs, &run.offsets));
                        all
                    });
                    CompletionChoice {
                        index: index as u32,
                        text: run.text,
                        logprobs,
                        finish_reason: Some(run.reason),
                    }
                })
                .collect(),
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

/// Identity of one response's chunks.
struct ResponseMeta {
    id: String,
    created: u64,
    model: String,
    endpoint: Endpoint,
    include_usage: bool,
}

impl ResponseMeta {
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.include_usage.then_some(None)
    }

    fn chat_chunk(
        &self,
        index: u32,
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
                index,
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
        index: u32,
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
                index,
                text,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
            system_fingerprint: None,
        })
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

/// One choice of a streamed response and its running state.
struct StreamingChoice {
    index: u32,
    candidate: usize,
    generation: Generation,
    /// The piece read before the headers went out.
    first: Option<Piece>,
    meta: Arc<ResponseMeta>,
    /// Bytes of this choice's text sent so far (completions `text_offset`).
    text_offset: usize,
    /// Logprobs of tokens whose text is still held back.
    pending_logprobs: Vec<TokenLogprob>,
    /// Reads the text for tool calls (chat with tools offered).
    tool_parser: Option<ToolCallParser>,
}

/// What one step of a streamed choice produced: chunks to send, and once it
/// has ended, how (its token counts, or the error that ends the response).
struct ChoiceUpdate {
    events: Vec<Event>,
    end: Option<Result<(usize, TokenCounts), ApiError>>,
}

impl StreamingChoice {
    /// A chunk carrying `text` and the logprobs of the tokens behind it.
    fn content_chunk(&mut self, text: String) -> Event {
        let logprobs = std::mem::take(&mut self.pending_logprobs);
        let offsets = vec![self.text_offset; logprobs.len()];
        self.text_offset += text.len();
        let want_logprobs = self.generation.wants_logprobs();
        match self.meta.endpoint {
            Endpoint::Chat => self.meta.chat_chunk(
                self.index,
                ChatDelta {
                    content: Some(text),
                    ..ChatDelta::default()
                },
                want_logprobs.then(|| chat_logprobs(&logprobs)),
                None,
            ),
            Endpoint::Completion => self.meta.completion_chunk(
                self.index,
                text,
                want_logprobs.then(|| completion_logprobs(&logprobs, &offsets)),
                None,
            ),
        }
    }

    /// The chunks for released `text`: one content chunk, or with tool
    /// parsing whatever the parser decided (perhaps nothing yet).
    fn text_chunks(&mut self, text: String) -> Vec<Event> {
        match self.tool_parser.as_mut() {
            None => vec![self.content_chunk(text)],
            Some(parser) => {
                let events = parser.push(&text);
                self.tool_event_chunks(events)
            }
        }
    }

    /// The text the tool parser still holds, decided now that the output ended.
    fn final_tool_chunks(&mut self) -> Vec<Event> {
        match self.tool_parser.as_mut() {
            None => Vec::new(),
            Some(parser) => {
                let events = parser.finish();
                self.tool_event_chunks(events)
            }
        }
    }

    fn tool_event_chunks(&mut self, events: Vec<ToolEvent>) -> Vec<Event> {
        let want_logprobs = self.generation.wants_logprobs();
        events
            .into_iter()
            .map(|event| {
                let logprobs = std::mem::take(&mut self.pending_logprobs);
                self.meta.chat_chunk(
                    self.index,
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

    /// The last chunk; it carries the logprobs of tokens whose text the tool
    /// parser held back and never released (a call's closing markup).
    fn finish_chunk(&mut self, reason: &'static str) -> Event {
        let held = std::mem::take(&mut self.pending_logprobs);
        let logprobs =
            (self.generation.wants_logprobs() && !held.is_empty()).then(|| chat_logprobs(&held));
        match self.meta.endpoint {
            Endpoint::Chat => {
                self.meta
                    .chat_chunk(self.index, ChatDelta::default(), logprobs, Some(reason))
            }
            Endpoint::Completion => {
                self.meta
                    .completion_chunk(self.index, String::new(), None, Some(reason))
            }
        }
    }

    /// The choice's updates until it ends. The stream owns the generation, so
    /// dropping it (a client that disconnects) cancels it.
    fn updates(self) -> impl Stream<Item = ChoiceUpdate> + Send + 'static {
        stream::unfold(Some(self), |state| async move {
            let mut c = state?;
            let piece = match c.first.take() {
                Some(piece) => Some(piece),
                None => c.generation.next_piece().await,
            };
            let update = match piece {
                Some(Piece::Delta { text, logprobs }) => {
                    c.pending_logprobs.extend(logprobs);
                    let events = if text.is_empty() {
                        Vec::new()
                    } else {
                        c.text_chunks(text)
                    };
                    return Some((ChoiceUpdate { events, end: None }, Some(c)));
                }
                Some(Piece::Finished {
                    text,
                    logprobs,
                    reason,
                }) => {
                    c.pending_logprobs.extend(logprobs);
                    let mut events = Vec::new();
                    if !text.is_empty() || !c.pending_logprobs.is_empty() {
                        events.extend(c.text_chunks(text));
                    }
                    events.extend(c.final_tool_chunks());
                    let reason = c.finish_reason(reason);
                    events.push(c.finish_chunk(reason));
                    ChoiceUpdate {
                        events,
                        end: Some(Ok((c.candidate, c.generation.counts()))),
                    }
                }
                Some(Piece::Failed(err)) => ChoiceUpdate {
                    events: Vec::new(),
                    end: Some(Err(err)),
                },
                None => ChoiceUpdate {
                    events: Vec::new(),
                    end: Some(Err(ApiError::internal(
                        "The generation ended without finishing.",
                    ))),
                },
            };
            Some((update, None))
        })
    }
}

fn sse_json<T: Serialize>(value: &T) -> Event {
    Event::default().data(serde_json::to_string(value).expect("response types serialize"))
}

fn done_event() -> Event {
    Event::default().data("[DONE]")
}

/// The SSE events after the opening chunks: every choice's chunks as they
/// come, each choice's own finish chunk, then the usage chunk if asked and
/// `[DONE]`. A failing choice ends the response with its error (and cancels
/// the others).
fn sse_events(
    choices: Vec<StreamingChoice>,
    meta: Arc<ResponseMeta>,
) -> impl Stream<Item = Event> + Send + 'static {
    struct Streaming {
        updates: stream::SelectAll<stream::BoxStream<'static, ChoiceUpdate>>,
        meta: Arc<ResponseMeta>,
        running: usize,
        tally: UsageTally,
        done: bool,
    }
    let state = Streaming {
        running: choices.len(),
        updates: stream::select_all(choices.into_iter().map(|c| c.updates().boxed())),
        meta,
        tally: UsageTally::default(),
        done: false,
    };
    stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        let mut events = Vec::new();
        match s.updates.next().await {
            Some(update) => {
                events = update.events;
                match update.end {
                    None => {}
                    Some(Ok((candidate, counts))) => {
                        s.tally.add(candidate, counts);
                        s.running -= 1;
                    }
                    Some(Err(err)) => {
                        s.done = true;
                        events.push(sse_json(&err.body()));
                        events.push(done_event());
                    }
                }
            }
            None => s.running = 0,
        }
        if s.running == 0 && !s.done {
            s.done = true;
            if s.meta.include_usage {
                events.push(s.meta.usage_chunk(s.tally.usage()));
            }
            events.push(done_event());
        }
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

fn top_logprobs_map(top: &[(String, f32)]) -> serde_json::Map<String, Value> {
    top.iter()
        .map(|(token, lp)| (token.clone(), Value::from(*lp)))
        .collect()
}

fn completion_logprobs(tokens: &[TokenLogprob], offsets: &[usize]) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.token.clone()).collect(),
        token_logprobs: tokens.iter().map(|t| Some(t.logprob)).collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| Some(top_logprobs_map(&t.top)))
            .collect(),
        text_offset: offsets.to_vec(),
    }
}

/// The legacy logprobs of an echoed prompt: null where nothing was reported
/// (always for the first token).
fn echo_logprobs(tokens: &[PromptToken]) -> CompletionLogprobs {
    CompletionLogprobs {
        tokens: tokens.iter().map(|t| t.token.clone()).collect(),
        token_logprobs: tokens
            .iter()
            .map(|t| t.logprob.as_ref().map(|l| l.logprob))
            .collect(),
        top_logprobs: tokens
            .iter()
            .map(|t| t.logprob.as_ref().map(|l| top_logprobs_map(&l.top)))
            .collect(),
        text_offset: tokens.iter().map(|t| t.offset).collect(),
    }
}

fn append_logprobs(to: &mut CompletionLogprobs, more: CompletionLogprobs) {
    to.tokens.extend(more.tokens);
    to.token_logprobs.extend(more.token_logprobs);
    to.top_logprobs.extend(more.top_logprobs);
    to.text_offset.extend(more.text_offset);
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
