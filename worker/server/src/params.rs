//! Request body → a validated generation plan, or a 4xx naming the problem.
//!
//! Everything a client can get wrong is checked here, before the engine sees
//! the request, so the engine only ever gets requests it can serve.

use axum::http::{header, HeaderMap};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::constraint;
use super::error::ApiError;
use super::protocol::{
    ChatCompletionRequest, ChatMessageIn, CommonFields, CompletionRequest, Request,
};
use super::tools::{self, ToolFamily, ToolParsing, ToolRequest};
use super::ServedModel;
#[cfg(test)]
use tandem_api::types::Grammar;
use tandem_api::types::{GenerateRequest, SamplingParams, StopParams};
use tandem_model::ChatMessage;

/// Most alternatives per token a client may ask for (OpenAI's chat limit).
pub const MAX_TOP_LOGPROBS: i64 = 20;

/// Most choices (`n`) or candidates (`best_of`) per prompt.
pub const MAX_CHOICES: i64 = 16;

/// Most prompts in one completions request.
pub const MAX_PROMPTS: usize = 64;

/// A request checked against the served model, ready to hand to `Infer`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// One per prompt; several only for a batched completions `prompt`.
    pub prompts: Vec<PlannedPrompt>,
    /// Shared by every engine request of the plan, but for the seed
    /// ([`Plan::engine_requests`]).
    pub sampling: SamplingParams,
    /// Text-level stop strings, applied by the HTTP layer.
    pub stop_strings: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// Report logprobs with this many alternatives per token.
    pub logprobs: Option<usize>,
    /// Read the output for tool calls (chat with tools offered).
    pub tool_parsing: Option<ToolParsing>,
    /// Choices returned per prompt.
    pub n: usize,
    /// Candidates generated per prompt (≥ `n`); the `n` with the highest
    /// cumulative logprob are returned.
    pub best_of: usize,
}

/// One prompt of a plan, fitted into the context.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedPrompt {
    pub tokens: Vec<u32>,
    /// `max_tokens` depends on the prompt's length, so each has its own.
    pub stop: StopParams,
    /// With `echo`: the prompt's text, which each of its choices starts with.
    pub echo: Option<String>,
}

impl Plan {
    /// The engine requests, `best_of` per prompt, prompt by prompt. Candidate
    /// `i` of a prompt samples with `seed + i`: the candidates differ, and each
    /// is what a request with that seed alone would give. Ids are `id`, or
    /// `id-k` when the plan needs several requests.
    pub fn engine_requests(&self, id: &str) -> Vec<GenerateRequest> {
        let several = self.prompts.len() * self.best_of > 1;
        let mut requests = Vec::with_capacity(self.prompts.len() * self.best_of);
        for prompt in &self.prompts {
            for candidate in 0..self.best_of {
                let k = requests.len();
                let mut sampling = self.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(candidate as u64));
                requests.push(GenerateRequest {
                    id: if several {
                        format!("{id}-{k}")
                    } else {
                        id.to_string()
                    },
                    prompt: prompt.tokens.clone(),
                    sampling,
                    stop: prompt.stop.clone(),
                });
            }
        }
        requests
    }
}

/// Check the content type and parse the body into `T`; every failure is a 4xx
/// whose `param` names the offending field when serde can tell, and a field
/// `T`'s endpoint does not know is refused by name.
pub fn parse_body<T: Request>(headers: &HeaderMap, body: &[u8]) -> Result<T, ApiError> {
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
    let Value::Object(fields) = &value else {
        return Err(ApiError::bad_request(format!(
            "Request body must be a JSON object, got {}.",
            json_type_name(&value)
        )));
    };
    check_fields::<T>(fields)?;
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

/// 400 for the first top-level field that is neither in `T` nor ignored by its
/// endpoint. A field the server knows but does not implement says so; a null
/// one asks for nothing and passes.
fn check_fields<T: Request>(fields: &Map<String, Value>) -> Result<(), ApiError> {
    let known = struct_fields::<T>();
    let policy = T::FIELDS;
    for (name, value) in fields {
        let name = name.as_str();
        if known.contains(&name) || policy.ignored.contains(&name) {
            continue;
        }
        if policy.not_supported.contains(&name) {
            if value.is_null() {
                continue;
            }
            return Err(ApiError::invalid_param(
                name,
                format!("`{name}` is not supported by this server."),
            ));
        }
        return Err(ApiError::invalid_param(
            name,
            format!("Unknown field `{name}`; this endpoint does not accept it."),
        ));
    }
    Ok(())
}

/// The field names `T`'s derived `Deserialize` reads: serde hands them to
/// `deserialize_struct`, which this deserializer records and then stops.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};

    struct FieldNames<'a>(&'a mut &'static [&'static str]);

    impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
        type Error = serde::de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Error::custom("field names read"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
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

pub(crate) fn json_type_name(v: &Value) -> &'static str {
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
    let tools = ToolRequest::check(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
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
    let partial = check_common(
        req.common(),
        req.max_completion_tokens,
        model.tokenizer.vocab_size(),
    )?;

    let template = model.chat_template.as_ref().ok_or_else(|| {
        ApiError::bad_request(format!(
            "The model `{}` has no chat template; use /v1/completions with a plain prompt.",
            names.name
        ))
    })?;
    let messages = chat_messages(&req.messages)?;
    let text = template
        .render_with_tools(&messages, tools.offered(), true)
        .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
    let tokens = model
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::internal(format!("Tokenizing the prompt failed: {e}")))?;
    let prompt = PromptInput {
        tokens,
        param: "messages".to_string(),
        text: None,
    };
    let choices = Choices {
        n: partial.n,
        best_of: partial.n,
    };
    let mut plan = partial.finish(
        vec![prompt],
        model.max_model_len,
        default_max_tokens,
        logprobs,
        choices,
        false,
    )?;
    let family = ToolFamily::of_template(template);
    if let Some(grammar) = tools.grammar(family) {
        if plan.sampling.grammar.is_some() {
            return Err(ApiError::invalid_param(
                "response_format",
                "response_format cannot be combined with tool_choice \"required\" or a named \
                 function: both constrain the output.",
            ));
        }
        plan.sampling.grammar = Some(grammar);
    }
    plan.tool_parsing = tools.parsing(family);
    Ok(plan)
}

pub fn plan_completion(
    req: &CompletionRequest,
    names: &ModelNames<'_>,
    model: &ServedModel,
    default_max_tokens: usize,
) -> Result<Plan, ApiError> {
    check_model(&req.model, names)?;
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid_param(
            "suffix",
            "suffix is not supported by this server.",
        ));
    }
    let logprobs = match req.logprobs {
        Some(k) => Some(check_top_logprobs(k, "logprobs")?),
        None => None,
    };
    let partial = check_common(req.common(), None, model.tokenizer.vocab_size())?;
    let choices = check_best_of(req.best_of, partial.n, partial.stream)?;
    let echo = req.echo.unwrap_or(false);
    let prompts = completion_prompts(req.prompt.as_ref(), model, echo)?;
    partial.finish(
        prompts,
        model.max_model_len,
        default_max_tokens,
        logprobs,
        choices,
        echo,
    )
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

/// How many choices a prompt gets, and from how many candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Choices {
    n: usize,
    best_of: usize,
}

fn check_n(n: Option<i64>) -> Result<usize, ApiError> {
    match n.unwrap_or(1) {
        n @ 1..=MAX_CHOICES => Ok(n as usize),
        n => Err(ApiError::invalid_param(
            "n",
            format!("n must be between 1 and {MAX_CHOICES}, got {n}."),
        )),
    }
}

/// `best_of` (completions): at least `n`, at most [`MAX_CHOICES`], and not
/// streamed, since the best are known only once all have finished.
fn check_best_of(best_of: Option<i64>, n: usize, stream: bool) -> Result<Choices, ApiError> {
    let Some(best_of) = best_of else {
        return Ok(Choices { n, best_of: n });
    };
    if !(1..=MAX_CHOICES).contains(&best_of) {
        return Err(ApiError::invalid_param(
            "best_of",
            format!("best_of must be between 1 and {MAX_CHOICES}, got {best_of}."),
        ));
    }
    let best_of = best_of as usize;
    if best_of < n {
        return Err(ApiError::invalid_param(
            "best_of",
            format!("best_of must be at least n ({n}), got {best_of}."),
        ));
    }
    if stream && best_of > n {
        return Err(ApiError::invalid_param(
            "best_of",
            "best_of greater than n cannot be streamed: the best are known only at the end.",
        ));
    }
    Ok(Choices { n, best_of })
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
    n: usize,
}

/// Check the fields every request has and turn them into engine parameters.
/// `max_completion_tokens` (chat only) is the newer name of `max_tokens` and
/// wins when both are given.
fn check_common(
    f: CommonFields<'_>,
    max_completion_tokens: Option<i64>,
    vocab: usize,
) -> Result<PartialPlan, ApiError> {
    let n = check_n(*f.n)?;
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
    let min_p = check_min_p(*f.min_p)?;
    let presence_penalty = check_penalty(*f.presence_penalty, "presence_penalty")?;
    let frequency_penalty = check_penalty(*f.frequency_penalty, "frequency_penalty")?;
    let repetition_penalty = check_repetition_penalty(*f.repetition_penalty)?;
    let logit_bias = logit_bias(f.logit_bias.as_ref(), vocab)?;
    let grammar = constraint::grammar(f)?;
    let stop_strings = stop_strings(f.stop.as_ref())?;
    let stop_token_ids = f.stop_token_ids.clone().unwrap_or_default();
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
            min_p,
            // Negative seeds are valid in OpenAI's schema; keep their bits.
            seed: f.seed.map(|s| s as u64),
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            logit_bias,
            grammar,
            ..SamplingParams::default()
        },
        stop_strings,
        stop_token_ids,
        ignore_eos: f.ignore_eos.unwrap_or(false),
        requested_max_tokens,
        stream,
        include_usage,
        n,
    })
}

/// One prompt as the request gave it, before its length is checked.
struct PromptInput {
    tokens: Vec<u32>,
    /// The field its errors name: `prompt`, `prompt[2]`, `messages`.
    param: String,
    /// The prompt's text, for `echo`: as given, or its token ids decoded.
    text: Option<String>,
}

impl PartialPlan {
    /// Fit each prompt's generation into the context now that the prompts are
    /// known. `logprobs` is what the client sees; `best_of` needs them too, to
    /// rank its candidates, and `echo` with logprobs asks for the prompt's.
    fn finish(
        self,
        prompts: Vec<PromptInput>,
        context: usize,
        default_max_tokens: usize,
        logprobs: Option<usize>,
        choices: Choices,
        echo: bool,
    ) -> Result<Plan, ApiError> {
        let prompts = prompts
            .into_iter()
            .map(|prompt| {
                let max_tokens = fit_max_tokens(
                    prompt.tokens.len(),
                    &prompt.param,
                    self.requested_max_tokens,
                    context,
                    default_max_tokens,
                )?;
                Ok(PlannedPrompt {
                    tokens: prompt.tokens,
                    stop: StopParams {
                        max_tokens,
                        stop_token_ids: self.stop_token_ids.clone(),
                        ignore_eos: self.ignore_eos,
                    },
                    echo: if echo { prompt.text } else { None },
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let mut sampling = self.sampling;
        let ranked = choices.best_of > choices.n;
        sampling.logprobs = logprobs.or(ranked.then_some(0));
        sampling.prompt_logprobs = if echo { logprobs } else { None };
        Ok(Plan {
            prompts,
            sampling,
            stop_strings: self.stop_strings,
            stream: self.stream,
            include_usage: self.include_usage,
            logprobs,
            tool_parsing: None,
            n: choices.n,
            best_of: choices.best_of,
        })
    }
}

/// `max_tokens` for a prompt of `prompt_len` tokens: as requested if it fits
/// the context, else the room left capped at `default_max_tokens`.
fn fit_max_tokens(
    prompt_len: usize,
    prompt_param: &str,
    requested: Option<(usize, &'static str)>,
    context: usize,
    default_max_tokens: usize,
) -> Result<usize, ApiError> {
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
    match requested {
        Some((m, param)) if m > room => Err(ApiError::invalid_param(
            param,
            format!(
                "This model's maximum context length is {context} tokens and the \
                 prompt uses {prompt_len}, so {param} may be at most {room}; got {m}."
            ),
        )),
        Some((m, _)) => Ok(m),
        None => Ok(room.min(default_max_tokens)),
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

fn check_min_p(value: Option<f64>) -> Result<f32, ApiError> {
    let v = value.unwrap_or(0.0);
    if (0.0..=1.0).contains(&v) {
        Ok(v as f32)
    } else {
        Err(ApiError::invalid_param(
            "min_p",
            format!("min_p must be between 0 and 1, got {v}."),
        ))
    }
}

/// vLLM's convention: above 1 discourages repeats, below 1 encourages them, 1 disables.
fn check_repetition_penalty(value: Option<f64>) -> Result<f32, ApiError> {
    let v = value.unwrap_or(1.0);
    if v > 0.0 && v.is_finite() {
        Ok(v as f32)
    } else {
        Err(ApiError::invalid_param(
            "repetition_penalty",
            format!("repetition_penalty must be greater than 0 (1 disables it), got {v}."),
        ))
    }
}

/// OpenAI's `logit_bias`: an object whose keys are token ids (as strings) and
/// values are biases in [-100, 100]. Sorted by token id.
fn logit_bias(value: Option<&Value>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let entries = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(entries)) => entries,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "logit_bias",
                format!(
                    "logit_bias must be an object mapping token ids to biases, got {}.",
                    json_type_name(other)
                ),
            ))
        }
    };
    let mut biases = entries
        .iter()
        .map(|(key, bias)| {
            let id = key
                .parse::<u32>()
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "logit_bias",
                        format!(
                            "logit_bias key `{key}` is not a token id below the vocabulary \
                             size {vocab}."
                        ),
                    )
                })?;
            match bias.as_f64() {
                Some(b) if (-100.0..=100.0).contains(&b) => Ok((id, b as f32)),
                _ => Err(ApiError::invalid_param(
                    "logit_bias",
                    format!(
                        "logit_bias[\"{key}\"] must be a number between -100 and 100, got {bias}."
                    ),
                )),
            }
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    biases.sort_unstable_by_key(|&(id, _)| id);
    Ok(biases)
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
        "tool" => Some("tool"),
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
                         developer, user, assistant or tool.",
                        m.role
                    ),
                )
            })?;
            let content = message_text(m.content.as_ref(), role, i)?;
            let (tool_calls, tool_call_id) = tools::message_tool_fields(m, i)?;
            Ok(ChatMessage {
                tool_calls,
                tool_call_id,
                name: m.name.clone(),
                ..ChatMessage::new(role, content)
            })
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

/// The prompts of a completions `prompt`: a string, an array of token ids, or
/// a batch of either (an array of strings, an array of arrays of token ids).
fn completion_prompts(
    prompt: Option<&Value>,
    model: &ServedModel,
    echo: bool,
) -> Result<Vec<PromptInput>, ApiError> {
    let text_prompt = |text: &str, param: String| -> Result<PromptInput, ApiError> {
        let tokens = model
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::internal(format!("Tokenizing the prompt failed: {e}")))?;
        Ok(PromptInput {
            tokens,
            param,
            text: echo.then(|| text.to_string()),
        })
    };
    let vocab = model.tokenizer.vocab_size();
    let ids_prompt = |items: &[Value], param: String| -> Result<PromptInput, ApiError> {
        let tokens = token_ids(items, vocab, &param)?;
        let text = echo.then(|| model.tokenizer.decode(&tokens, true));
        Ok(PromptInput {
            tokens,
            param,
            text,
        })
    };
    let items = match prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid_param(
                "prompt",
                "prompt is missing; give a string or an array of token ids.",
            ))
        }
        Some(Value::String(s)) => return Ok(vec![text_prompt(s, "prompt".into())?]),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(ApiError::invalid_param(
                "prompt",
                format!(
                    "prompt must be a string or an array of token ids (or, for a batch, an \
                     array of either), got {}.",
                    json_type_name(other)
                ),
            ))
        }
    };
    let batch_of = match items.first() {
        None => {
            return Err(ApiError::invalid_param(
                "prompt",
                "prompt is an empty array.",
            ))
        }
        Some(Value::String(_)) => "strings",
        Some(Value::Array(_)) => "arrays of token ids",
        Some(_) => return Ok(vec![ids_prompt(items, "prompt".into())?]),
    };
    if items.len() > MAX_PROMPTS {
        return Err(ApiError::invalid_param(
            "prompt",
            format!(
                "prompt holds {} prompts; at most {MAX_PROMPTS} are allowed in one request.",
                items.len()
            ),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let param = format!("prompt[{i}]");
            match item {
                Value::String(s) if batch_of == "strings" => text_prompt(s, param),
                Value::Array(ids) if batch_of != "strings" => ids_prompt(ids, param),
                other => Err(ApiError::invalid_param(
                    param.clone(),
                    format!(
                        "{param} is {}, but prompt[0] makes this a batch of {batch_of}.",
                        json_type_name(other)
                    ),
                )),
            }
        })
        .collect()
}

fn token_ids(items: &[Value], vocab: usize, param: &str) -> Result<Vec<u32>, ApiError> {
    let vocab = vocab as u64;
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
    use serde_json::json;
    use std::sync::Arc;
    use tandem_api::infer::{GenerateStream, Infer, InferError};
    use tandem_model::Tokenizer;

    const VOCAB: usize = 300;
    const CONTEXT: usize = 64;

    /// Planning never reaches the engine.
    struct NoEngine;

    impl Infer for NoEngine {
        fn generate(&self, _: GenerateRequest) -> Result<GenerateStream, InferError> {
            unreachable!("planning does not generate")
        }

        fn is_ready(&self) -> bool {
            true
        }
    }

    fn served() -> ServedModel {
        let vocab = tandem_model::testing::tiny_vocab(VOCAB);
        ServedModel {
            infer: Arc::new(NoEngine),
            tokenizer: Tokenizer::from_byte_level_bpe(vocab).unwrap(),
            chat_template: None,
            max_model_len: CONTEXT,
        }
    }

    const NAMES: ModelNames<'static> = ModelNames {
        name: "m",
        aliases: &[],
    };

    fn completion_plan(fields: Value) -> Result<Plan, ApiError> {
        let mut body = json!({"model": "m", "prompt": "hello"});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req: CompletionRequest = parse_body(&json_headers(), body.to_string().as_bytes())?;
        plan_completion(&req, &NAMES, &served(), 16)
    }

    fn refused_param(fields: Value) -> String {
        let err = completion_plan(fields.clone()).expect_err(&fields.to_string());
        err.param
            .unwrap_or_else(|| panic!("no param: {}", err.message))
    }

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
        let chat = br#"{"model": "m", "messages": [], "top_k": "3"}"#;
        let chat = parse_body::<ChatCompletionRequest>(&json_headers(), chat).unwrap_err();
        let completion = br#"{"model": "m", "prompt": "x", "top_k": "3"}"#;
        let completion = parse_body::<CompletionRequest>(&json_headers(), completion).unwrap_err();
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

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let err = completion_plan(json!({"frobnicate": 1})).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("frobnicate"));
        assert!(
            err.message.contains("Unknown field `frobnicate`"),
            "{}",
            err.message
        );
        let chat = br#"{"model": "m", "messages": [], "audio": {"voice": "x"}}"#;
        let err = parse_body::<ChatCompletionRequest>(&json_headers(), chat).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("audio"));
        assert!(err.message.contains("not supported"), "{}", err.message);
        // Chat-only fields are unknown to completions.
        assert_eq!(refused_param(json!({"messages": []})), "messages");
        assert_eq!(
            refused_param(json!({"max_completion_tokens": 3})),
            "max_completion_tokens"
        );
    }

    #[test]
    fn harmless_fields_and_null_unsupported_ones_pass() {
        let chat = br#"{"model": "m", "messages": [], "user": "u", "metadata": {"a": "b"},
            "store": false, "service_tier": "auto", "tool_choice": "auto",
            "parallel_tool_calls": true, "functions": null}"#;
        assert!(parse_body::<ChatCompletionRequest>(&json_headers(), chat).is_ok());
        assert!(completion_plan(json!({"user": "u"})).is_ok());
    }

    #[test]
    fn known_fields_are_read_from_the_request_structs() {
        let completion = struct_fields::<CompletionRequest>();
        for field in [
            "model",
            "prompt",
            "echo",
            "best_of",
            "max_tokens",
            "logit_bias",
            "guided_choice",
        ] {
            assert!(
                completion.contains(&field),
                "{field} missing from {completion:?}"
            );
        }
        let chat = struct_fields::<ChatCompletionRequest>();
        for field in [
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "response_format",
            "min_p",
        ] {
            assert!(chat.contains(&field), "{field} missing from {chat:?}");
        }
    }

    /// A field is either implemented (a struct field) or deliberately
    /// ignored, never both: once a field gets implemented it leaves the list.
    #[test]
    fn ignored_and_refused_fields_are_not_request_fields() {
        fn check<T: Request>() {
            let fields = struct_fields::<T>();
            for name in T::FIELDS.ignored.iter().chain(T::FIELDS.not_supported) {
                assert!(
                    !fields.contains(name),
                    "`{name}` is a request field and listed too"
                );
            }
        }
        check::<ChatCompletionRequest>();
        check::<CompletionRequest>();
    }

    #[test]
    fn new_sampling_fields_reach_the_sampling_params() {
        let plan = completion_plan(json!({
            "min_p": 0.25, "repetition_penalty": 1.3,
            "logit_bias": {"12": 5, "3": -100, "299": 100.0}
        }))
        .unwrap();
        assert_eq!(plan.sampling.min_p, 0.25);
        assert_eq!(plan.sampling.repetition_penalty, 1.3);
        assert_eq!(
            plan.sampling.logit_bias,
            vec![(3, -100.0), (12, 5.0), (299, 100.0)]
        );
        let defaults = completion_plan(json!({})).unwrap();
        assert_eq!(defaults.sampling.min_p, 0.0);
        assert_eq!(defaults.sampling.repetition_penalty, 1.0);
        assert!(defaults.sampling.logit_bias.is_empty());
        assert_eq!(defaults.sampling.grammar, None);
    }

    #[test]
    fn out_of_range_sampling_fields_are_refused() {
        for fields in [
            json!({"min_p": -0.1}),
            json!({"min_p": 1.5}),
            json!({"repetition_penalty": 0}),
            json!({"repetition_penalty": -1}),
            json!({"logit_bias": [1, 2]}),
            json!({"logit_bias": {"abc": 1}}),
            json!({"logit_bias": {"-1": 1}}),
            json!({"logit_bias": {"300": 1}}),
            json!({"logit_bias": {"5": 101}}),
            json!({"logit_bias": {"5": "high"}}),
        ] {
            let name = fields.as_object().unwrap().keys().next().unwrap().clone();
            assert_eq!(refused_param(fields), name);
        }
    }

    #[test]
    fn a_grammar_reaches_the_sampling_params() {
        let plan = completion_plan(json!({"guided_regex": "[ab]+"})).unwrap();
        assert_eq!(plan.sampling.grammar, Some(Grammar::Regex("[ab]+".into())));
    }

    #[test]
    fn n_and_best_of_ranges() {
        assert_eq!(refused_param(json!({"n": 0})), "n");
        assert_eq!(refused_param(json!({"n": 17})), "n");
        assert_eq!(refused_param(json!({"best_of": 0})), "best_of");
        assert_eq!(refused_param(json!({"best_of": 17})), "best_of");
        assert_eq!(refused_param(json!({"n": 3, "best_of": 2})), "best_of");
        assert_eq!(
            refused_param(json!({"best_of": 2, "stream": true})),
            "best_of"
        );
        // best_of equal to n ranks nothing, so it may stream.
        let plan = completion_plan(json!({"n": 2, "best_of": 2, "stream": true})).unwrap();
        assert_eq!((plan.n, plan.best_of), (2, 2));
        assert_eq!(plan.sampling.logprobs, None);
    }

    #[test]
    fn best_of_asks_the_engine_for_logprobs_but_not_the_client() {
        let plan = completion_plan(json!({"best_of": 3})).unwrap();
        assert_eq!((plan.n, plan.best_of), (1, 3));
        assert_eq!(plan.sampling.logprobs, Some(0));
        assert_eq!(plan.logprobs, None);
        let plan = completion_plan(json!({"best_of": 3, "logprobs": 2})).unwrap();
        assert_eq!(plan.sampling.logprobs, Some(2));
        assert_eq!(plan.logprobs, Some(2));
    }

    #[test]
    fn engine_requests_cover_every_prompt_and_candidate_with_shifted_seeds() {
        let plan = completion_plan(json!({"prompt": ["ab", "cde"], "n": 2, "seed": 7})).unwrap();
        let requests = plan.engine_requests("cmpl-x");
        let summary: Vec<(String, usize, Option<u64>)> = requests
            .iter()
            .map(|r| (r.id.clone(), r.prompt.len(), r.sampling.seed))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("cmpl-x-0".to_string(), 2, Some(7)),
                ("cmpl-x-1".to_string(), 2, Some(8)),
                ("cmpl-x-2".to_string(), 3, Some(7)),
                ("cmpl-x-3".to_string(), 3, Some(8)),
            ]
        );
        // Each prompt's room decides its own default max_tokens.
        assert_eq!(requests[0].stop.max_tokens, 16);
        let one = completion_plan(json!({}))
            .unwrap()
            .engine_requests("cmpl-y");
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].id, "cmpl-y");
        assert_eq!(one[0].sampling.seed, None);
    }

    #[test]
    fn batched_prompts_of_text_or_token_ids() {
        let plan = completion_plan(json!({"prompt": [[5, 6], [7]]})).unwrap();
        let prompts: Vec<Vec<u32>> = plan.prompts.iter().map(|p| p.tokens.clone()).collect();
        assert_eq!(prompts, vec![vec![5, 6], vec![7]]);
        assert_eq!(
            completion_plan(json!({"prompt": ["a", "b", "c"]}))
                .unwrap()
                .prompts
                .len(),
            3
        );
        assert_eq!(refused_param(json!({"prompt": ["a", 5]})), "prompt[1]");
        assert_eq!(refused_param(json!({"prompt": [[5], "a"]})), "prompt[1]");
        assert_eq!(refused_param(json!({"prompt": ["a", ""]})), "prompt[1]");
        assert_eq!(
            refused_param(json!({"prompt": [[5], [999]]})),
            "prompt[1][0]"
        );
        let too_many = vec!["a"; MAX_PROMPTS + 1];
        assert_eq!(refused_param(json!({"prompt": too_many})), "prompt");
        assert_eq!(
            completion_plan(json!({"prompt": vec!["a"; MAX_PROMPTS]}))
                .unwrap()
                .prompts
                .len(),
            MAX_PROMPTS
        );
        // A prompt too long for the context is named by its place in the batch.
        let long = "x".repeat(CONTEXT * 2);
        assert_eq!(refused_param(json!({"prompt": ["a", long]})), "prompt[1]");
    }

    #[test]
    fn echo_keeps_the_prompt_text_and_asks_for_prompt_logprobs_with_logprobs() {
        let plan = completion_plan(json!({"echo": true})).unwrap();
        assert_eq!(plan.prompts[0].echo.as_deref(), Some("hello"));
        assert_eq!(plan.sampling.prompt_logprobs, None);
        let plan = completion_plan(json!({"echo": true, "logprobs": 3})).unwrap();
        assert_eq!(plan.sampling.prompt_logprobs, Some(3));
        // Token-id prompts echo their decoded text.
        let ids = served().tokenizer.encode("hi there").unwrap();
        let plan = completion_plan(json!({"echo": true, "prompt": ids})).unwrap();
        assert_eq!(plan.prompts[0].echo.as_deref(), Some("hi there"));
        let plan = completion_plan(json!({"logprobs": 3})).unwrap();
        assert_eq!(plan.prompts[0].echo, None);
        assert_eq!(plan.sampling.prompt_logprobs, None);
        assert_eq!(refused_param(json!({"suffix": "end"})), "suffix");
        assert!(completion_plan(json!({"suffix": ""})).is_ok());
    }
}
