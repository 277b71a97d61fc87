//! One admitted request on its way out: engine events in, text pieces out,
//! frontend metrics recorded on the way.
//!
//! `Generation` owns the request's `GenerateStream`; dropping the generation
//! (a client that hangs up drops the response body, which drops it) cancels
//! the request in the engine. A matched stop string drops the stream at once,
//! so the engine stops spending steps on text nobody will see.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::text::TextAssembler;
use tandem_api::infer::GenerateStream;
use tandem_api::metrics::metrics;
use tandem_api::types::{FinishReason, GenerateEvent, TokenOutput};
use tandem_model::Tokenizer;
use tandem_telemetry::phases::Phases;

/// The log-probability of one generated token, with alternatives, as text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// A prompt token as `echo` with logprobs reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptToken {
    pub token: String,
    /// Byte offset of the token's text in the echoed prompt.
    pub offset: usize,
    /// `None` for the first token, which nothing before it predicts, and for
    /// any token the engine reported no logprob for.
    pub logprob: Option<TokenLogprob>,
}

/// Prompt and generated token counts of one generation, for `usage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenCounts {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// What the next event(s) of a generation produced.
#[derive(Debug)]
pub enum Piece {
    /// Text released by one token (possibly empty while a stop string or a
    /// multi-byte character is undecided), and that token's logprobs.
    Delta {
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// The generation ended, by a stop string (`text` ends before it and
    /// `logprobs` covers the token that completed it), or by the engine
    /// (`text` is whatever was still held back).
    Finished {
        text: String,
        logprobs: Vec<TokenLogprob>,
        reason: &'static str,
    },
    /// The engine failed; the request cannot complete.
    Failed(ApiError),
}

pub struct Generation {
    events: Option<GenerateStream>,
    assembler: TextAssembler,
    tokenizer: Tokenizer,
    want_logprobs: bool,
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
    /// The prompt's token logprobs, when the request asked for them.
    pub prompt_logprobs: Vec<TokenOutput>,
    /// Sum of the generated tokens' logprobs, where the engine reported them
    /// (`best_of` ranks its candidates by it).
    pub cumulative_logprob: f64,
    record: RequestRecord,
    /// The engine phases' spans (`tandem serve` with tracing on).
    phases: Option<Phases>,
}

impl Generation {
    pub fn new(
        events: GenerateStream,
        tokenizer: &Tokenizer,
        stop_strings: Vec<String>,
        want_logprobs: bool,
        prompt_tokens: usize,
        record: RequestRecord,
    ) -> Self {
        Self {
            events: Some(events),
            assembler: TextAssembler::new(tokenizer, stop_strings),
            tokenizer: tokenizer.clone(),
            want_logprobs,
            prompt_tokens,
            cached_tokens: 0,
            completion_tokens: 0,
            prompt_logprobs: Vec::new(),
            cumulative_logprob: 0.0,
            record,
            phases: None,
        }
    }

    /// Records the engine's phases (`queue`, `prefill`, `decode`) of this
    /// generation as spans under the current one. Only where the events come
    /// straight from an engine (`tandem serve`); a decode worker records its own.
    pub fn with_phases(mut self, phases: Option<Phases>) -> Self {
        self.phases = phases;
        self
    }

    /// Give up on a generation admitted as part of a request that was then
    /// refused: it counts with the refusal's outcome, and dropping it cancels it.
    pub fn release(mut self, err: &ApiError) {
        self.record.finish(err.outcome(), 0);
    }

    pub fn counts(&self) -> TokenCounts {
        TokenCounts {
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            completion_tokens: self.completion_tokens,
        }
    }

    /// The next piece; `None` once the generation has finished or failed.
    pub async fn next_piece(&mut self) -> Option<Piece> {
        loop {
            let events = self.events.as_mut()?;
            let event = events.next_event().await;
            match event {
                Some(GenerateEvent::Started {
                    prompt_tokens,
                    cached_tokens,
                }) => {
                    self.prompt_tokens = prompt_tokens;
                    self.cached_tokens = cached_tokens;
                    if let Some(p) = &mut self.phases {
                        p.admitted();
                    }
                }
                Some(GenerateEvent::PromptLogprobs(tokens)) => self.prompt_logprobs = tokens,
                Some(GenerateEvent::Token(token)) => {
                    if let Some(p) = &mut self.phases {
                        p.token();
                    }
                    return Some(self.on_token(&token));
                }
                Some(GenerateEvent::Finished(reason)) => {
                    if let Some(p) = &mut self.phases {
                        p.finish(match reason {
                            FinishReason::Stop => "stop",
                            FinishReason::Length => "length",
                            FinishReason::Cancelled => "cancelled",
                        });
                    }
                    self.events = None;
                    return Some(self.on_finished(reason));
                }
                Some(GenerateEvent::Error(message)) => {
                    if let Some(p) = &mut self.phases {
                        p.finish("error");
                    }
                    self.events = None;
                    return Some(
                        self.fail(ApiError::internal(format!("Generation failed: {message}"))),
                    );
                }
                None => {
                    self.events = None;
                    return Some(self.fail(ApiError::internal(
                        "The engine ended the request without finishing it.",
                    )));
                }
            }
        }
    }

    fn on_token(&mut self, token: &TokenOutput) -> Piece {
        self.completion_tokens += 1;
        self.cumulative_logprob += token.logprob.map_or(0.0, f64::from);
        self.record.token_arrived();
        let logprobs = if self.want_logprobs {
            vec![self.token_logprob(token)]
        } else {
            Vec::new()
        };
        let released = self.assembler.push(token.id);
        if released.stopped {
            // Dropping the stream cancels the engine request: the answer is complete.
            self.events = None;
            if let Some(p) = &mut self.phases {
                p.finish("stop");
            }
            self.record.finish("ok", self.completion_tokens);
            return Piece::Finished {
                text: released.text,
                logprobs,
                reason: "stop",
            };
        }
        Piece::Delta {
            text: released.text,
            logprobs,
        }
    }

    fn on_finished(&mut self, reason: FinishReason) -> Piece {
        let tail = self.assembler.finish();
        let reason = match reason {
            _ if tail.stopped => "stop",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => {
                return self.fail(ApiError::unavailable(
                    "The server cancelled the request before it finished.",
                ))
            }
        };
        self.record.finish("ok", self.completion_tokens);
        Piece::Finished {
            text: tail.text,
            logprobs: Vec::new(),
            reason,
        }
    }

    fn fail(&mut self, err: ApiError) -> Piece {
        self.record.finish(err.outcome(), self.completion_tokens);
        Piece::Failed(err)
    }

    /// Whether the client asked for logprobs.
    pub fn wants_logprobs(&self) -> bool {
        self.want_logprobs
    }

    /// `prompt`'s tokens with their text, their offset in the prompt's text
    /// (`text_len` bytes long; decoding may not give back exactly the text the
    /// client sent, so offsets stay inside it) and the logprobs the engine
    /// reported for them. Call it once the first piece has arrived: the
    /// prompt's logprobs come before the first token.
    pub fn echoed_prompt(&self, prompt: &[u32], text_len: usize) -> Vec<PromptToken> {
        let mut decoder = self.tokenizer.incremental();
        let mut decoded = 0;
        prompt
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let offset = decoded.min(text_len);
                decoded += decoder.push(id).len();
                // The engine reports every prompt token from the second on.
                let reported = i
                    .checked_sub(1)
                    .and_then(|j| self.prompt_logprobs.get(j))
                    .filter(|t| t.id == id && t.logprob.is_some());
                PromptToken {
                    token: self.tokenizer.decode(&[id], false),
                    offset,
                    logprob: reported.map(|t| self.token_logprob(t)),
                }
            })
            .collect()
    }

    fn token_logprob(&self, token: &TokenOutput) -> TokenLogprob {
        TokenLogprob {
            token: self.tokenizer.decode(&[token.id], false),
            logprob: token.logprob.unwrap_or(f32::NAN),
            top: token
                .top_logprobs
                .iter()
                .map(|&(id, lp)| (self.tokenizer.decode(&[id], false), lp))
                .collect(),
        }
    }
}

/// The frontend metrics of one request. Created at admission; whatever
/// happens to the request afterwards, dropping it records the outcome
/// (`cancelled` when nobody recorded another, i.e. the client went away).
pub struct RequestRecord {
    model: String,
    arrived: Instant,
    last_token: Option<Instant>,
    outcome: Option<&'static str>,
    output_tokens: usize,
    inflight: Arc<AtomicUsize>,
}

impl RequestRecord {
    pub fn admitted(
        model: &str,
        arrived: Instant,
        prompt_tokens: usize,
        inflight: Arc<AtomicUsize>,
    ) -> Self {
        let m = metrics();
        m.inflight_requests.with_label_values(&[model]).inc();
        m.input_tokens
            .with_label_values(&[model])
            .observe(prompt_tokens as f64);
        inflight.fetch_add(1, Ordering::SeqCst);
        Self {
            model: model.to_string(),
            arrived,
            last_token: None,
            outcome: None,
            output_tokens: 0,
            inflight,
        }
    }

    fn token_arrived(&mut self) {
        let now = Instant::now();
        let m = metrics();
        match self.last_token {
            None => m
                .time_to_first_token
                .with_label_values(&[&self.model])
                .observe(now.duration_since(self.arrived).as_secs_f64()),
            Some(prev) => m
                .inter_token_latency
                .with_label_values(&[&self.model])
                .observe(now.duration_since(prev).as_secs_f64()),
        }
        self.last_token = Some(now);
    }

    fn finish(&mut self, outcome: &'static str, output_tokens: usize) {
        if self.outcome.is_none() {
            self.outcome = Some(outcome);
            self.output_tokens = output_tokens;
        }
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let m = metrics();
        let outcome = self.outcome.unwrap_or("cancelled");
        m.requests_total
            .with_label_values(&[self.model.as_str(), outcome])
            .inc();
        m.request_duration
            .with_label_values(&[&self.model])
            .observe(self.arrived.elapsed().as_secs_f64());
        m.output_tokens
            .with_label_values(&[&self.model])
            .observe(self.output_tokens as f64);
        m.inflight_requests.with_label_values(&[&self.model]).dec();
        self.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Count a request refused before admission.
pub fn record_rejected(model: &str, err: &ApiError) {
    metrics()
        .requests_total
        .with_label_values(&[model, err.outcome()])
        .inc();
}
