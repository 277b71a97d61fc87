//! Tool calling: a request's `tools`, `tool_choice` and `parallel_tool_calls`
//! checked; the grammar that makes `required` and named choices always
//! produce calls that parse; and the parsers that turn a model's output into
//! OpenAI `tool_calls`, whole or streamed.
//!
//! Models write calls in their family's own syntax ([`ToolFamily`]), which the
//! chat template reveals. Templates that know nothing of tools get the
//! Hermes-style rendering of `tandem_model::chat`, so their models are read as
//! Hermes too.

use std::collections::HashSet;

use serde_json::{json, Value};
use tandem_api::types::Grammar;
use tandem_model::{ChatTemplate, ChatToolCall};

use super::error::ApiError;
use super::protocol::{ChatDelta, ChatMessageIn, FunctionCallOut, ToolCallDelta, ToolCallOut};

/// How a model family writes tool calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFamily {
    /// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per
    /// call: Hermes, Qwen 2.5 and 3, and the fallback rendering.
    Hermes,
    /// `{"name": ..., "parameters": {...}}` as the whole answer, optionally
    /// after `<|python_tag|>`, several calls separated by `;`: Llama 3.1 to 3.3.
    Llama3,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFamily {
    /// Llama 3 templates mention `<|python_tag|>` or the `ipython` role; any
    /// other template, and every template rendered with the fallback, is Hermes.
    pub fn of_template(template: &ChatTemplate) -> Self {
        let source = template.source();
        if template.knows_tools() && (source.contains(PYTHON_TAG) || source.contains("ipython")) {
            ToolFamily::Llama3
        } else {
            ToolFamily::Hermes
        }
    }

    /// The key the family writes a call's arguments under (the parser takes
    /// either `arguments` or `parameters`, whichever comes first).
    fn arguments_key(self) -> &'static str {
        match self {
            ToolFamily::Hermes => "arguments",
            ToolFamily::Llama3 => "parameters",
        }
    }
}

/// What the request lets the model do with its tools.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoice {
    /// Tools are neither offered nor parsed.
    None,
    /// Offered; the model decides; calls in its output are parsed.
    Auto,
    /// Offered, and the output is constrained to calls.
    Required,
    /// Offered, and the output is constrained to calls of this function.
    Function(String),
}

/// A request's `tools`, `tool_choice` and `parallel_tool_calls`, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    /// The tool objects as sent (each checked to be a function tool).
    tools: Vec<Value>,
    choice: ToolChoice,
    parallel: bool,
}

/// How the HTTP layer reads one request's output for calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolParsing {
    pub family: ToolFamily,
    /// At most this many calls are reported (`parallel_tool_calls: false`).
    pub max_calls: Option<usize>,
}

impl ToolRequest {
    /// Check the request's tool fields; every problem is a 400 naming its field.
    pub fn check(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel_tool_calls: Option<bool>,
    ) -> Result<Self, ApiError> {
        let tools = check_tools(tools)?;
        let choice = match tool_choice {
            None | Some(Value::Null) if tools.is_empty() => ToolChoice::None,
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::invalid_param(
                        "tool_choice",
                        format!(
                            "tool_choice must be \"none\", \"auto\", \"required\" or \
                             {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got \"{other}\"."
                        ),
                    ))
                }
            },
            Some(Value::Object(choice)) => {
                let kind = choice.get("type").and_then(Value::as_str);
                if kind != Some("function") {
                    return Err(ApiError::invalid_param(
                        "tool_choice.type",
                        "tool_choice.type must be \"function\".",
                    ));
                }
                let name = choice
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::invalid_param(
                            "tool_choice.function.name",
                            "tool_choice.function.name must be a string naming one of the tools.",
                        )
                    })?;
                if !tools.iter().any(|t| function_name(t) == name) {
                    return Err(ApiError::invalid_param(
                        "tool_choice.function.name",
                        format!("tool_choice names the function `{name}`, which is not in tools."),
                    ));
                }
                ToolChoice::Function(name.to_string())
            }
            Some(_) => {
                return Err(ApiError::invalid_param(
                    "tool_choice",
                    "tool_choice must be a string or an object.",
                ))
            }
        };
        if tools.is_empty() && matches!(choice, ToolChoice::Required | ToolChoice::Auto) {
            return Err(ApiError::invalid_param(
                "tool_choice",
                "tool_choice other than \"none\" needs tools to choose from.",
            ));
        }
        Ok(Self {
            tools,
            choice,
            parallel: parallel_tool_calls.unwrap_or(true),
        })
    }

    /// The tools to render into the prompt: none with `tool_choice: "none"`.
    pub fn offered(&self) -> Option<&[Value]> {
        match self.choice {
            ToolChoice::None => None,
            _ => Some(&self.tools),
        }
    }

    /// How to read the output, unless tools are off.
    pub fn parsing(&self, family: ToolFamily) -> Option<ToolParsing> {
        match self.choice {
            ToolChoice::None => None,
            _ => Some(ToolParsing {
                family,
                max_calls: (!self.parallel).then_some(1),
            }),
        }
    }

    /// The constraint of `required` and named choices: the output is the
    /// family's call syntax, naming an allowed function with arguments valid
    /// against its `parameters`; one call without `parallel_tool_calls`, else
    /// one or more.
    pub fn grammar(&self, family: ToolFamily) -> Option<Grammar> {
        let allowed: Vec<&Value> = match &self.choice {
            ToolChoice::None | ToolChoice::Auto => return None,
            ToolChoice::Required => self.tools.iter().collect(),
            ToolChoice::Function(name) => self
                .tools
                .iter()
                .filter(|t| function_name(t) == name)
                .collect(),
        };
        Some(Grammar::Lark(calls_grammar(
            family,
            &allowed,
            self.parallel,
        )))
    }
}

fn check_tools(tools: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let items =
        match tools {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Array(items)) => items,
            Some(_) => return Err(ApiError::invalid_param(
                "tools",
                "tools must be an array of {\"type\": \"function\", \"function\": {...}} objects.",
            )),
        };
    let mut names = HashSet::new();
    for (i, tool) in items.iter().enumerate() {
        let at = format!("tools[{i}]");
        if !tool.is_object() {
            return Err(ApiError::invalid_param(
                at.clone(),
                format!(
                    "{at} must be an object {{\"type\": \"function\", \"function\": {{...}}}}."
                ),
            ));
        }
        match tool.get("type") {
            Some(Value::String(t)) if t == "function" => {}
            Some(Value::String(t)) => {
                return Err(ApiError::invalid_param(
                    format!("{at}.type"),
                    format!("{at} has the unknown tool type `{t}`; only `function` is supported."),
                ))
            }
            _ => {
                return Err(ApiError::invalid_param(
                    format!("{at}.type"),
                    format!("{at}.type must be \"function\"."),
                ))
            }
        }
        let Some(function) = tool.get("function").filter(|f| f.is_object()) else {
            return Err(ApiError::invalid_param(
                format!("{at}.function"),
                format!("{at}.function must be an object with a `name`."),
            ));
        };
        let name = function.get("name").and_then(Value::as_str).unwrap_or("");
        if !is_function_name(name) {
            return Err(ApiError::invalid_param(
                format!("{at}.function.name"),
                format!(
                    "{at}.function.name must be 1 to 64 letters, digits, underscores or dashes."
                ),
            ));
        }
        if !names.insert(name) {
            return Err(ApiError::invalid_param(
                format!("{at}.function.name"),
                format!("{at}.function.name `{name}` is already the name of another tool."),
            ));
        }
        match function.get("description") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    format!("{at}.function.description"),
                    format!("{at}.function.description must be a string."),
                ))
            }
        }
        match function.get("parameters") {
            None | Some(Value::Null) | Some(Value::Object(_)) => {}
            Some(_) => {
                return Err(ApiError::invalid_param(
                    format!("{at}.function.parameters"),
                    format!("{at}.function.parameters must be a JSON Schema object."),
                ))
            }
        }
    }
    Ok(items.clone())
}

/// OpenAI's rule for function names.
fn is_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The name of a checked tool.
fn function_name(tool: &Value) -> &str {
    tool["function"]["name"].as_str().unwrap_or_default()
}

/// The Lark grammar (llguidance's dialect) of one or more calls to `tools`.
fn calls_grammar(family: ToolFamily, tools: &[&Value], parallel: bool) -> String {
    let key = family.arguments_key();
    let alternatives: Vec<Value> = tools
        .iter()
        .map(|tool| {
            let parameters = match &tool["function"]["parameters"] {
                Value::Object(schema) => Value::Object(schema.clone()),
                // OpenAI: no `parameters` is a function that takes none.
                _ => json!({"type": "object", "properties": {}, "additionalProperties": false}),
            };
            json!({
                "type": "object",
                "properties": {"name": {"const": function_name(tool)}, key: parameters},
                "required": ["name", key],
                "additionalProperties": false,
            })
        })
        .collect();
    let mut schema = match <[Value; 1]>::try_from(alternatives) {
        Ok([one]) => one,
        Err(many) => json!({ "anyOf": many }),
    };
    // The JSON the model is trained to write (`{"name": "f", "arguments": {...}}`),
    // with no free whitespace a small model could loop in.
    schema["x-guidance"] = json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    });
    let (call, separator) = match family {
        ToolFamily::Hermes => ("\"<tool_call>\\n\" body \"\\n</tool_call>\"", "\"\\n\""),
        ToolFamily::Llama3 => ("body", "\"; \""),
    };
    let repeat = if parallel {
        format!(" ({separator} call)*")
    } else {
        String::new()
    };
    format!("start: call{repeat}\ncall: {call}\nbody: %json {schema}\n")
}

/// The tool-call fields of message `index`, checked: the calls of an
/// assistant turn (their `arguments` parsed, as templates expect), the
/// `tool_call_id` a `tool` turn answers.
pub fn message_tool_fields(
    message: &ChatMessageIn,
    index: usize,
) -> Result<(Vec<ChatToolCall>, Option<String>), ApiError> {
    let at = format!("messages[{index}]");
    let calls = match &message.tool_calls {
        None | Some(Value::Null) => Vec::new(),
        Some(_) if message.role != "assistant" => {
            return Err(ApiError::invalid_param(
                format!("{at}.tool_calls"),
                format!(
                    "{at} is a {} message; only assistant messages carry tool_calls.",
                    message.role
                ),
            ))
        }
        Some(Value::Array(calls)) => calls
            .iter()
            .enumerate()
            .map(|(j, call)| message_tool_call(call, &format!("{at}.tool_calls[{j}]")))
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                format!("{at}.tool_calls"),
                format!("{at}.tool_calls must be an array."),
            ))
        }
    };
    let call_id = match (&message.tool_call_id, message.role.as_str()) {
        (Some(id), "tool") => Some(id.clone()),
        (None, "tool") => {
            return Err(ApiError::invalid_param(
                format!("{at}.tool_call_id"),
                format!(
                    "{at} is a tool message without tool_call_id, the id of the call it answers."
                ),
            ))
        }
        _ => None,
    };
    Ok((calls, call_id))
}

fn message_tool_call(call: &Value, at: &str) -> Result<ChatToolCall, ApiError> {
    let field = |name: &str| call.get(name);
    let id = field("id").and_then(Value::as_str).ok_or_else(|| {
        ApiError::invalid_param(format!("{at}.id"), format!("{at}.id must be a string."))
    })?;
    match field("type").and_then(Value::as_str) {
        None | Some("function") => {}
        Some(other) => {
            return Err(ApiError::invalid_param(
                format!("{at}.type"),
                format!("{at} has the unknown tool type `{other}`; only `function` is supported."),
            ))
        }
    }
    let function = field("function").filter(|f| f.is_object()).ok_or_else(|| {
        ApiError::invalid_param(
            format!("{at}.function"),
            format!("{at}.function must be an object with `name` and `arguments`."),
        )
    })?;
    let name = function
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::invalid_param(
                format!("{at}.function.name"),
                format!("{at}.function.name must be a string."),
            )
        })?;
    let arguments = match function.get("arguments") {
        // The wire's JSON text; text that does not parse (a model's broken
        // call sent back) still reaches the template, as a string.
        Some(Value::String(text)) => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
        }
        Some(Value::Object(args)) => Value::Object(args.clone()),
        None | Some(Value::Null) => json!({}),
        Some(_) => {
            return Err(ApiError::invalid_param(
                format!("{at}.function.arguments"),
                format!("{at}.function.arguments must be a string of JSON."),
            ))
        }
    };
    Ok(ChatToolCall::function(id, name, arguments))
}

// ---- reading the output ----

/// A piece of parsed output, in the order the client should see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolEvent {
    /// Text outside any call.
    Content(String),
    /// A call begins: its id and function name (arguments follow).
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of a call's arguments, as JSON text.
    Arguments { index: usize, fragment: String },
}

impl ToolEvent {
    /// The streamed `delta` carrying this event, the shape the `openai`
    /// client accumulates: a call's first delta has its `id`, `type` and
    /// name with empty arguments; later ones only argument text.
    pub fn into_delta(self) -> ChatDelta {
        let call = |delta: ToolCallDelta| ChatDelta {
            tool_calls: Some(vec![delta]),
            ..ChatDelta::default()
        };
        match self {
            ToolEvent::Content(text) => ChatDelta {
                content: Some(text),
                ..ChatDelta::default()
            },
            ToolEvent::CallStart { index, id, name } => call(ToolCallDelta::start(index, id, name)),
            ToolEvent::Arguments { index, fragment } => {
                call(ToolCallDelta::arguments(index, fragment))
            }
        }
    }
}

/// A whole output read for calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedOutput {
    /// `None` when the output was only calls.
    pub content: Option<String>,
    pub tool_calls: Vec<ToolCallOut>,
}

/// `finish_reason` for an output that ended with `reason`: an answer that
/// made calls and ended by itself ends for `tool_calls`.
pub fn finish_reason(saw_calls: bool, reason: &'static str) -> &'static str {
    if saw_calls && reason == "stop" {
        "tool_calls"
    } else {
        reason
    }
}

/// Reads a model's output, fed as text deltas, into content and calls.
///
/// Text that could still become part of a call (the start of `<tool_call>`,
/// or a Llama answer's opening `{`) is held back until decided, so it never
/// reaches the client as content. A call is announced once its name is known;
/// its arguments then stream as the model writes them. A would-be call that
/// breaks before naming a function is given back as content. Whitespace at
/// the end of content is held back too and dropped if a call follows it, so
/// an answer of calls alone has no content.
#[derive(Debug)]
pub struct ToolCallParser {
    parsing: ToolParsing,
    state: ParseState,
    /// Text received and not yet decided; in a call, the call's body so far.
    held: String,
    /// Calls announced so far (the next call's index).
    calls: usize,
    /// Whitespace content not yet sent, in case a call follows.
    pending_space: String,
    out: Vec<ToolEvent>,
}

#[derive(Debug)]
enum ParseState {
    /// Hermes: ordinary text, watching for `<tool_call>`. Llama: nothing but
    /// whitespace seen yet.
    Text,
    /// Llama: the answer is not calls; everything is content.
    Plain,
    /// Inside a call, `held` being its body.
    Call(CallProgress),
}

/// What one call has sent so far.
#[derive(Debug, Default)]
struct CallProgress {
    /// Its index once announced.
    index: Option<usize>,
    /// Beyond `max_calls`: read, never reported.
    dropped: bool,
    /// Bytes of the body sent as argument text (the argument value's end so far).
    arguments_sent: usize,
    arguments_any: bool,
    /// Text before the body that is given back with it if the call breaks.
    opening: String,
}

impl ToolCallParser {
    pub fn new(parsing: ToolParsing) -> Self {
        Self {
            parsing,
            state: ParseState::Text,
            held: String::new(),
            calls: 0,
            pending_space: String::new(),
            out: Vec::new(),
        }
    }

    /// Read a whole output: the parser that streams, fed at once, so both
    /// report the same calls.
    pub fn read_whole(mut self, text: &str) -> ParsedOutput {
        let mut events = self.push(text);
        events.extend(self.finish());
        let mut content = String::new();
        let mut tool_calls: Vec<ToolCallOut> = Vec::new();
        for event in events {
            match event {
                ToolEvent::Content(text) => content.push_str(&text),
                ToolEvent::CallStart { id, name, .. } => tool_calls.push(ToolCallOut {
                    id,
                    kind: "function",
                    function: FunctionCallOut {
                        name,
                        arguments: String::new(),
                    },
                }),
                ToolEvent::Arguments { index, fragment } => {
                    tool_calls[index].function.arguments.push_str(&fragment)
                }
            }
        }
        ParsedOutput {
            content: (tool_calls.is_empty() || !content.is_empty()).then_some(content),
            tool_calls,
        }
    }

    /// Whether any call has been announced.
    pub fn saw_calls(&self) -> bool {
        self.calls > 0
    }

    /// Feed the next text delta; returns what it decided.
    pub fn push(&mut self, text: &str) -> Vec<ToolEvent> {
        self.held.push_str(text);
        self.advance(false);
        std::mem::take(&mut self.out)
    }

    /// The output ended: decide everything still held back.
    pub fn finish(&mut self) -> Vec<ToolEvent> {
        self.advance(true);
        if self.calls == 0 && !self.pending_space.is_empty() {
            let space = std::mem::take(&mut self.pending_space);
            self.out.push(ToolEvent::Content(space));
        }
        std::mem::take(&mut self.out)
    }

    fn advance(&mut self, at_end: bool) {
        loop {
            let progressed = match self.parsing.family {
                ToolFamily::Hermes => self.step_hermes(at_end),
                ToolFamily::Llama3 => self.step_llama(at_end),
            };
            if !progressed {
                break;
            }
        }
    }

    /// One decision for Hermes output; false when waiting for more text.
    fn step_hermes(&mut self, at_end: bool) -> bool {
        match &self.state {
            ParseState::Text | ParseState::Plain => {
                if let Some(at) = self.held.find(HERMES_OPEN) {
                    let before = self.take_held(at);
                    self.content(&before);
                    self.take_held(HERMES_OPEN.len());
                    self.state = ParseState::Call(CallProgress {
                        opening: HERMES_OPEN.to_string(),
                        ..CallProgress::default()
                    });
                    return true;
                }
                let keep = if at_end {
                    0
                } else {
                    partial_marker_len(&self.held, HERMES_OPEN)
                };
                let text = self.take_held(self.held.len() - keep);
                self.content(&text);
                false
            }
            ParseState::Call(_) => {
                let scan = scan_call(&self.held);
                self.send_call_progress(&scan);
                let json_end = match scan.end {
                    CallEnd::Open if at_end => self.held.len(),
                    CallEnd::Open => return false,
                    CallEnd::Closed(at) | CallEnd::Broken(at) => at,
                };
                // The call ends at `</tool_call>`, or where another begins.
                let rest = &self.held[json_end..];
                let end = match (rest.find(HERMES_CLOSE), rest.find(HERMES_OPEN)) {
                    (Some(close), Some(open)) if open < close => json_end + open,
                    (Some(close), _) => json_end + close + HERMES_CLOSE.len(),
                    (None, Some(open)) => json_end + open,
                    (None, None) if at_end => self.held.len(),
                    (None, None) => return false,
                };
                let body = self.take_held(end);
                self.end_call(&body);
                self.state = ParseState::Text;
                true
            }
        }
    }

    /// One decision for Llama 3 output; false when waiting for more text.
    fn step_llama(&mut self, at_end: bool) -> bool {
        match &self.state {
            ParseState::Text => {
                let start = self.held.len() - self.held.trim_start().len();
                let rest = &self.held[start..];
                let opening_len = if rest.starts_with(PYTHON_TAG) {
                    start + PYTHON_TAG.len()
                } else if rest.starts_with('{') {
                    start
                } else if !at_end && (rest.is_empty() || PYTHON_TAG.starts_with(rest)) {
                    return false;
                } else {
                    self.state = ParseState::Plain;
                    return true;
                };
                let opening = self.take_held(opening_len);
                self.state = ParseState::Call(CallProgress {
                    opening,
                    ..CallProgress::default()
                });
                true
            }
            ParseState::Plain => {
                let text = std::mem::take(&mut self.held);
                self.content(&text);
                false
            }
            ParseState::Call(_) => {
                let scan = scan_call(&self.held);
                self.send_call_progress(&scan);
                match scan.end {
                    CallEnd::Open if !at_end => false,
                    CallEnd::Open => {
                        let body = std::mem::take(&mut self.held);
                        self.end_call(&body);
                        self.state = ParseState::Plain;
                        true
                    }
                    CallEnd::Closed(at) => {
                        let after = self.held[at..].trim_start();
                        if after.is_empty() && !at_end {
                            return false;
                        }
                        let next_call = after.starts_with(';');
                        let body = self.take_held(at);
                        self.end_call(&body);
                        if next_call {
                            let space = self.held.len() - self.held.trim_start().len();
                            self.take_held(space + 1);
                            self.state = ParseState::Call(CallProgress::default());
                        } else {
                            // Text after the calls is content.
                            self.state = ParseState::Plain;
                        }
                        true
                    }
                    CallEnd::Broken(at) => {
                        let body = self.take_held(at);
                        self.end_call(&body);
                        self.state = ParseState::Plain;
                        true
                    }
                }
            }
        }
    }

    /// Announce the current call once its name is known, and send its
    /// arguments as far as they have been written.
    fn send_call_progress(&mut self, scan: &CallScan) {
        let ParseState::Call(call) = &mut self.state else {
            return;
        };
        if call.index.is_none() {
            let Some(name) = &scan.name else {
                return;
            };
            let index = self.calls;
            call.dropped = self.parsing.max_calls.is_some_and(|max| index >= max);
            call.index = Some(index);
            if call.dropped {
                return;
            }
            self.calls += 1;
            // Whitespace between text and a call is not content.
            self.pending_space.clear();
            self.out.push(ToolEvent::CallStart {
                index,
                id: new_call_id(),
                name: name.clone(),
            });
        }
        let (Some(index), false, Some(args)) = (call.index, call.dropped, &scan.arguments) else {
            return;
        };
        let fragment = if args.is_string {
            // Arguments written as a JSON string of JSON: sent once, decoded.
            if !args.complete || call.arguments_any {
                return;
            }
            let text = &self.held[args.start..args.end];
            serde_json::from_str::<String>(text).unwrap_or_else(|_| text.to_string())
        } else {
            let from = call.arguments_sent.max(args.start);
            if args.end <= from {
                return;
            }
            call.arguments_sent = args.end;
            self.held[from..args.end].to_string()
        };
        call.arguments_any = true;
        self.out.push(ToolEvent::Arguments { index, fragment });
    }

    /// The current call is over, its text being `body`: an announced call
    /// without arguments gets `{}`; one never announced is given back as content.
    fn end_call(&mut self, body: &str) {
        let ParseState::Call(call) = std::mem::replace(&mut self.state, ParseState::Text) else {
            return;
        };
        match call.index {
            Some(_) if call.dropped => {}
            Some(index) => {
                if !call.arguments_any {
                    self.out.push(ToolEvent::Arguments {
                        index,
                        fragment: "{}".to_string(),
                    });
                }
            }
            None => {
                let text = format!("{}{body}", call.opening);
                self.content(&text);
            }
        }
    }

    /// Send `text` as content, except its trailing whitespace: that waits
    /// for the next content (or the end), and goes if a call comes first.
    fn content(&mut self, text: &str) {
        let body = text.trim_end();
        if !body.is_empty() {
            let mut all = std::mem::take(&mut self.pending_space);
            all.push_str(body);
            self.out.push(ToolEvent::Content(all));
        }
        self.pending_space.push_str(&text[body.len()..]);
    }

    /// Remove and return the first `len` bytes of `held`.
    fn take_held(&mut self, len: usize) -> String {
        let rest = self.held.split_off(len);
        std::mem::replace(&mut self.held, rest)
    }
}

/// `call_` and 24 random hex digits, like OpenAI's call ids.
fn new_call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// The length of the longest end of `text` that is a proper beginning of `marker`.
fn partial_marker_len(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

// ---- scanning a call's JSON as it arrives ----

/// What is known of a call's JSON object (`{"name": ..., "arguments": ...}`) so far.
#[derive(Debug, Default, PartialEq)]
struct CallScan {
    name: Option<String>,
    arguments: Option<ArgumentsSpan>,
    end: CallEnd,
}

/// Where the arguments' value lies in the body.
#[derive(Debug, PartialEq)]
struct ArgumentsSpan {
    start: usize,
    /// How far the value has been written (its end once complete).
    end: usize,
    complete: bool,
    is_string: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum CallEnd {
    /// The object is still being written.
    #[default]
    Open,
    /// The object ended just before this byte.
    Closed(usize),
    /// The text stopped being JSON (or a call) at this byte.
    Broken(usize),
}

/// One JSON value scanned: complete up to a byte, cut off by the end of the
/// text, or broken at a byte.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scanned {
    Done(usize),
    Partial,
    Broken(usize),
}

/// Nesting beyond this is treated as broken rather than recursed into.
const MAX_DEPTH: usize = 128;

fn scan_call(body: &str) -> CallScan {
    let b = body.as_bytes();
    let mut scan = CallScan::default();
    let mut i = skip_space(b, 0);
    let Some(&first) = b.get(i) else {
        return scan;
    };
    if first != b'{' {
        scan.end = CallEnd::Broken(i);
        return scan;
    }
    i += 1;
    let mut first_member = true;
    loop {
        i = skip_space(b, i);
        let Some(&c) = b.get(i) else {
            return scan;
        };
        if c == b'}' && first_member {
            scan.end = CallEnd::Closed(i + 1);
            return scan;
        }
        first_member = false;
        if c != b'"' {
            return broken(scan, i);
        }
        let key_start = i;
        let key_end = match scan_string(b, i) {
            Scanned::Done(end) => end,
            _ => return scan,
        };
        let Ok(key) = serde_json::from_str::<String>(&body[key_start..key_end]) else {
            return broken(scan, key_start);
        };
        i = skip_space(b, key_end);
        match b.get(i) {
            None => return scan,
            Some(b':') => i = skip_space(b, i + 1),
            Some(_) => return broken(scan, i),
        }
        let Some(&value_first) = b.get(i) else {
            return scan;
        };
        let value_start = i;
        let value = scan_value(b, i, 0);
        if key == "name" {
            match value {
                Scanned::Done(end) if value_first == b'"' => {
                    match serde_json::from_str::<String>(&body[value_start..end]) {
                        Ok(name) if scan.name.is_none() => scan.name = Some(name),
                        Ok(_) => {}
                        Err(_) => return broken(scan, value_start),
                    }
                }
                Scanned::Partial if value_first == b'"' => return scan,
                _ => return broken(scan, value_start),
            }
        } else if (key == "arguments" || key == "parameters") && scan.arguments.is_none() {
            scan.arguments = Some(ArgumentsSpan {
                start: value_start,
                end: match value {
                    Scanned::Done(end) => end,
                    Scanned::Partial => b.len(),
                    Scanned::Broken(at) => at,
                },
                complete: matches!(value, Scanned::Done(_)),
                is_string: value_first == b'"',
            });
        }
        i = match value {
            Scanned::Done(end) => skip_space(b, end),
            Scanned::Partial => return scan,
            Scanned::Broken(at) => return broken(scan, at),
        };
        match b.get(i) {
            None => return scan,
            Some(b',') => i += 1,
            Some(b'}') => {
                scan.end = CallEnd::Closed(i + 1);
                return scan;
            }
            Some(_) => return broken(scan, i),
        }
    }
}

fn broken(mut scan: CallScan, at: usize) -> CallScan {
    scan.end = CallEnd::Broken(at);
    scan
}

fn skip_space(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Scan the JSON value starting at `b[i]`. Lenient where leniency costs
/// nothing (numbers are not checked digit by digit, control characters may
/// stand in strings): its job is finding where values end, not validating them.
fn scan_value(b: &[u8], i: usize, depth: usize) -> Scanned {
    let Some(&c) = b.get(i) else {
        return Scanned::Partial;
    };
    match c {
        b'"' => scan_string(b, i),
        b'{' | b'[' if depth >= MAX_DEPTH => Scanned::Broken(i),
        b'{' => scan_container(b, i, b'}', true, depth),
        b'[' => scan_container(b, i, b']', false, depth),
        b't' => scan_literal(b, i, b"true"),
        b'f' => scan_literal(b, i, b"false"),
        b'n' => scan_literal(b, i, b"null"),
        b'-' | b'0'..=b'9' => {
            let mut j = i + 1;
            while b.get(j).is_some_and(|c| {
                c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-')
            }) {
                j += 1;
            }
            if j == b.len() {
                Scanned::Partial
            } else {
                Scanned::Done(j)
            }
        }
        _ => Scanned::Broken(i),
    }
}

fn scan_string(b: &[u8], i: usize) -> Scanned {
    let mut j = i + 1;
    loop {
        match b.get(j) {
            None => return Scanned::Partial,
            Some(b'\\') => j += 2,
            Some(b'"') => return Scanned::Done(j + 1),
            Some(_) => j += 1,
        }
    }
}

fn scan_literal(b: &[u8], i: usize, word: &[u8]) -> Scanned {
    for (k, &expected) in word.iter().enumerate() {
        match b.get(i + k) {
            None => return Scanned::Partial,
            Some(&c) if c == expected => {}
            Some(_) => return Scanned::Broken(i + k),
        }
    }
    Scanned::Done(i + word.len())
}

/// An object (`keyed`) or array from its opening bracket.
fn scan_container(b: &[u8], i: usize, close: u8, keyed: bool, depth: usize) -> Scanned {
    let mut j = skip_space(b, i + 1);
    match b.get(j) {
        None => return Scanned::Partial,
        Some(&c) if c == close => return Scanned::Done(j + 1),
        Some(_) => {}
    }
    loop {
        if keyed {
            if b.get(j) != Some(&b'"') {
                return Scanned::Broken(j);
            }
            j = match scan_string(b, j) {
                Scanned::Done(end) => skip_space(b, end),
                other => return other,
            };
            match b.get(j) {
                None => return Scanned::Partial,
                Some(b':') => j = skip_space(b, j + 1),
                Some(_) => return Scanned::Broken(j),
            }
        }
        j = match scan_value(b, j, depth + 1) {
            Scanned::Done(end) => skip_space(b, end),
            other => return other,
        };
        match b.get(j) {
            None => return Scanned::Partial,
            Some(b',') => j = skip_space(b, j + 1),
            Some(&c) if c == close => return Scanned::Done(j + 1),
            Some(_) => return Scanned::Broken(j),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HERMES: ToolParsing = ToolParsing {
        family: ToolFamily::Hermes,
        max_calls: None,
    };
    const LLAMA: ToolParsing = ToolParsing {
        family: ToolFamily::Llama3,
        max_calls: None,
    };

    /// What a client accumulates from events: content, then per call its
    /// name and arguments (ids are random, so only their shape is checked).
    #[derive(Debug, PartialEq)]
    struct Accumulated {
        content: String,
        calls: Vec<(String, String)>,
    }

    fn accumulate(events: &[ToolEvent]) -> Accumulated {
        let mut acc = Accumulated {
            content: String::new(),
            calls: Vec::new(),
        };
        for event in events {
            match event {
                ToolEvent::Content(text) => acc.content.push_str(text),
                ToolEvent::CallStart { index, id, name } => {
                    assert_eq!(*index, acc.calls.len(), "calls are announced in order");
                    assert!(id.starts_with("call_") && id.len() == 29, "{id}");
                    acc.calls.push((name.clone(), String::new()));
                }
                ToolEvent::Arguments { index, fragment } => {
                    let call = acc
                        .calls
                        .get_mut(*index)
                        .expect("arguments after the start");
                    call.1.push_str(fragment);
                }
            }
        }
        acc
    }

    fn whole(parsing: ToolParsing, text: &str) -> Accumulated {
        let mut parser = ToolCallParser::new(parsing);
        let mut events = parser.push(text);
        events.extend(parser.finish());
        accumulate(&events)
    }

    fn calls(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, a)| (n.to_string(), a.to_string()))
            .collect()
    }

    /// Every way of cutting `text` in two, and one character at a time, gives
    /// the same result as the whole text at once.
    fn assert_split_anywhere_is_whole(parsing: ToolParsing, text: &str) {
        let expected = whole(parsing, text);
        let cuts = (0..=text.len()).filter(|&k| text.is_char_boundary(k));
        for k in cuts {
            let mut parser = ToolCallParser::new(parsing);
            let mut events = parser.push(&text[..k]);
            events.extend(parser.push(&text[k..]));
            events.extend(parser.finish());
            assert_eq!(accumulate(&events), expected, "cut at byte {k} of {text:?}");
        }
        let mut parser = ToolCallParser::new(parsing);
        let mut events = Vec::new();
        for c in text.chars() {
            events.extend(parser.push(c.encode_utf8(&mut [0; 4])));
        }
        events.extend(parser.finish());
        assert_eq!(
            accumulate(&events),
            expected,
            "one char at a time: {text:?}"
        );
    }

    const HERMES_TWO_CALLS: &str = concat!(
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"units\": [\"c\"]}}\n</tool_call>\n",
        "<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"zone\": \"CET \\\"x\\\" }\"}}\n</tool_call>",
    );

    #[test]
    fn hermes_calls_become_tool_calls_with_no_content() {
        assert_eq!(
            whole(HERMES, HERMES_TWO_CALLS),
            Accumulated {
                content: String::new(),
                calls: calls(&[
                    ("get_weather", "{\"city\": \"Paris\", \"units\": [\"c\"]}"),
                    ("get_time", "{\"zone\": \"CET \\\"x\\\" }\"}"),
                ]),
            }
        );
        let parsed = ToolCallParser::new(HERMES).read_whole(HERMES_TWO_CALLS);
        assert_eq!(parsed.content, None);
        assert_eq!(parsed.tool_calls.len(), 2);
        assert_ne!(parsed.tool_calls[0].id, parsed.tool_calls[1].id);
        let args: Value = serde_json::from_str(&parsed.tool_calls[1].function.arguments).unwrap();
        assert_eq!(args["zone"], "CET \"x\" }");
    }

    #[test]
    fn hermes_text_around_calls_is_content() {
        let text =
            "Let me look.\n<tool_call>{\"name\": \"f\", \"arguments\": {}}</tool_call>\nDone.";
        assert_eq!(
            whole(HERMES, text),
            Accumulated {
                content: "Let me look.\nDone.".into(),
                calls: calls(&[("f", "{}")]),
            }
        );
    }

    #[test]
    fn text_without_calls_is_content_unchanged() {
        for text in [
            "Paris is in France.",
            "a <tool b < c <tool_cal",
            "  \n",
            "",
            "{\"a\": 1}",
        ] {
            let parsed = ToolCallParser::new(HERMES).read_whole(text);
            assert_eq!(parsed.content.as_deref(), Some(text));
            assert!(parsed.tool_calls.is_empty());
        }
        for text in [
            "Paris.",
            "  {\"a\": [1, 2]} and more",
            "{not json",
            "<|python",
            "\n",
        ] {
            let parsed = ToolCallParser::new(LLAMA).read_whole(text);
            assert_eq!(parsed.content.as_deref(), Some(text), "{text:?}");
            assert!(parsed.tool_calls.is_empty());
        }
    }

    #[test]
    fn a_block_that_never_names_a_function_is_given_back_as_content() {
        let text = "<tool_call>\nI cannot call anything.\n</tool_call> ok";
        assert_eq!(whole(HERMES, text).content, text);
        let text = "<tool_call>{\"arguments\": {\"a\": 1}}</tool_call>";
        assert_eq!(whole(HERMES, text).content, text);
    }

    #[test]
    fn unusual_but_readable_calls_are_read() {
        // Arguments before the name; arguments as a JSON string; no arguments;
        // `parameters` for `arguments`; a missing closing brace; no closing tag.
        let text = concat!(
            "<tool_call>{\"arguments\": {\"a\": 1}, \"name\": \"first\"}</tool_call>",
            "<tool_call>{\"name\": \"second\", \"arguments\": \"{\\\"b\\\": 2}\"}</tool_call>",
            "<tool_call>{\"name\": \"third\"}</tool_call>",
            "<tool_call>{\"name\": \"fourth\", \"parameters\": {\"d\": null}}</tool_call>",
            "<tool_call>{\"name\": \"fifth\", \"arguments\": {\"e\": true}\n</tool_call>",
            "<tool_call>{\"name\": \"sixth\", \"arguments\": {\"f\": [1.5e3, ",
        );
        assert_eq!(
            whole(HERMES, text),
            Accumulated {
                content: String::new(),
                calls: calls(&[
                    ("first", "{\"a\": 1}"),
                    ("second", "{\"b\": 2}"),
                    ("third", "{}"),
                    ("fourth", "{\"d\": null}"),
                    ("fifth", "{\"e\": true}"),
                    ("sixth", "{\"f\": [1.5e3, "),
                ]),
            }
        );
        assert_split_anywhere_is_whole(HERMES, text);
    }

    #[test]
    fn without_parallel_calls_only_the_first_call_is_reported() {
        let one = ToolParsing {
            max_calls: Some(1),
            ..HERMES
        };
        assert_eq!(
            whole(one, HERMES_TWO_CALLS).calls,
            calls(&[("get_weather", "{\"city\": \"Paris\", \"units\": [\"c\"]}")])
        );
    }

    #[test]
    fn llama_calls_with_and_without_the_python_tag() {
        let text = " <|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"type\": \"function\", \"name\": \"get_time\", \"parameters\": {}}\n";
        assert_eq!(
            whole(LLAMA, text),
            Accumulated {
                content: String::new(),
                calls: calls(&[("get_weather", "{\"city\": \"Oslo\"}"), ("get_time", "{}")]),
            }
        );
        assert_split_anywhere_is_whole(LLAMA, text);
        let text = "{\"name\": \"f\", \"arguments\": {\"x\": \"é}\"}}";
        assert_eq!(whole(LLAMA, text).calls, calls(&[("f", "{\"x\": \"é}\"}")]));
        assert_split_anywhere_is_whole(LLAMA, text);
    }

    #[test]
    fn streaming_matches_the_whole_output_at_every_cut() {
        assert_split_anywhere_is_whole(HERMES, HERMES_TWO_CALLS);
        for text in [
            "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"q\": \"<tool_call>\"}}\n</tool_call>",
            "a <tool b <tool_call>oops</tool_call> c <tool_cal",
            "Paris, of course. «Très» bien.",
        ] {
            assert_split_anywhere_is_whole(HERMES, text);
        }
        for text in [
            "Hello there.",
            "{\"not\": \"a call\"} after",
            "<|python_tag|>{\"name\": \"f\"}",
        ] {
            assert_split_anywhere_is_whole(LLAMA, text);
        }
    }

    #[test]
    fn streamed_arguments_arrive_as_written_and_markers_never_leak() {
        let mut parser = ToolCallParser::new(HERMES);
        let mut seen = Vec::new();
        for piece in [
            "Hi <tool",
            "_call>\n{\"name\": \"f\", ",
            "\"arguments\": {\"a\": ",
            "\"xy",
            "z\"}}\n</tool_call>",
        ] {
            seen.push(parser.push(piece));
        }
        seen.push(parser.finish());
        let name_only: Vec<ToolEvent> = seen[1].clone();
        // `<tool` may open a call and the space before it may precede one: both wait.
        assert_eq!(seen[0], vec![ToolEvent::Content("Hi".into())]);
        assert!(
            matches!(&name_only[..], [ToolEvent::CallStart { name, index: 0, .. }] if name == "f")
        );
        let fragments: Vec<&str> = seen[2..]
            .iter()
            .flatten()
            .map(|e| match e {
                ToolEvent::Arguments { fragment, .. } => fragment.as_str(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(fragments, ["{\"a\": ", "\"xy", "z\"}"]);
    }

    #[test]
    fn deltas_have_the_shape_the_openai_client_accumulates() {
        let start = ToolEvent::CallStart {
            index: 0,
            id: "call_1".into(),
            name: "f".into(),
        };
        assert_eq!(
            serde_json::to_value(start.into_delta()).unwrap(),
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                   "function": {"name": "f", "arguments": ""}}]})
        );
        let more = ToolEvent::Arguments {
            index: 1,
            fragment: "{\"a\"".into(),
        };
        assert_eq!(
            serde_json::to_value(more.into_delta()).unwrap(),
            json!({"tool_calls": [{"index": 1, "function": {"arguments": "{\"a\""}}]})
        );
    }

    fn weather_tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "get_time"}},
        ])
    }

    fn check(tools: Value, choice: Value, parallel: Option<bool>) -> Result<ToolRequest, ApiError> {
        ToolRequest::check(Some(&tools), Some(&choice), parallel)
    }

    #[test]
    fn required_builds_a_grammar_of_one_or_more_hermes_calls() {
        let request = check(weather_tools(), json!("required"), None).unwrap();
        let Some(Grammar::Lark(lark)) = request.grammar(ToolFamily::Hermes) else {
            panic!("required must constrain the output");
        };
        let expected = concat!(
            "start: call (\"\\n\" call)*\n",
            "call: \"<tool_call>\\n\" body \"\\n</tool_call>\"\n",
            "body: %json {\"anyOf\":[",
            "{\"type\":\"object\",\"properties\":{\"name\":{\"const\":\"get_weather\"},",
            "\"arguments\":{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}},",
            "\"required\":[\"name\",\"arguments\"],\"additionalProperties\":false},",
            "{\"type\":\"object\",\"properties\":{\"name\":{\"const\":\"get_time\"},",
            "\"arguments\":{\"type\":\"object\",\"properties\":{},\"additionalProperties\":false}},",
            "\"required\":[\"name\",\"arguments\"],\"additionalProperties\":false}],",
            "\"x-guidance\":{\"whitespace_flexible\":false,\"item_separator\":\", \",\"key_separator\":\": \"}}\n",
        );
        assert_eq!(lark, expected);
        assert_eq!(request.offered().map(<[Value]>::len), Some(2));
        assert_eq!(
            request.parsing(ToolFamily::Hermes),
            Some(ToolParsing {
                family: ToolFamily::Hermes,
                max_calls: None
            })
        );
    }

    #[test]
    fn a_named_function_without_parallel_calls_is_exactly_one_llama_call() {
        let choice = json!({"type": "function", "function": {"name": "get_time"}});
        let request = check(weather_tools(), choice, Some(false)).unwrap();
        let Some(Grammar::Lark(lark)) = request.grammar(ToolFamily::Llama3) else {
            panic!("a named function must constrain the output");
        };
        let expected = concat!(
            "start: call\n",
            "call: body\n",
            "body: %json {\"type\":\"object\",\"properties\":{\"name\":{\"const\":\"get_time\"},",
            "\"parameters\":{\"type\":\"object\",\"properties\":{},\"additionalProperties\":false}},",
            "\"required\":[\"name\",\"parameters\"],\"additionalProperties\":false,",
            "\"x-guidance\":{\"whitespace_flexible\":false,\"item_separator\":\", \",\"key_separator\":\": \"}}\n",
        );
        assert_eq!(lark, expected);
        assert_eq!(
            request.parsing(ToolFamily::Llama3).unwrap().max_calls,
            Some(1)
        );
    }

    #[test]
    fn auto_and_none_do_not_constrain_and_none_offers_nothing() {
        let auto = check(weather_tools(), Value::Null, None).unwrap();
        assert_eq!(auto.grammar(ToolFamily::Hermes), None);
        assert!(auto.offered().is_some() && auto.parsing(ToolFamily::Hermes).is_some());
        let none = check(weather_tools(), json!("none"), None).unwrap();
        assert_eq!(none.offered(), None);
        assert_eq!(none.parsing(ToolFamily::Hermes), None);
        let no_tools = ToolRequest::check(None, None, None).unwrap();
        assert_eq!(no_tools.offered(), None);
    }

    #[test]
    fn bad_tool_fields_are_400s_naming_the_field() {
        let param = |r: Result<ToolRequest, ApiError>| r.unwrap_err().param.unwrap();
        let retrieval = json!([{"type": "retrieval", "function": {"name": "f"}}]);
        assert_eq!(param(check(retrieval, Value::Null, None)), "tools[0].type");
        assert_eq!(
            param(check(json!({"type": "function"}), Value::Null, None)),
            "tools"
        );
        assert_eq!(param(check(json!(["f"]), Value::Null, None)), "tools[0]");
        let no_function = json!([{"type": "function"}]);
        assert_eq!(
            param(check(no_function, Value::Null, None)),
            "tools[0].function"
        );
        let bad_name = json!([{"type": "function", "function": {"name": "a b"}}]);
        assert_eq!(
            param(check(bad_name, Value::Null, None)),
            "tools[0].function.name"
        );
        let twice = json!([{"type": "function", "function": {"name": "f"}},
                           {"type": "function", "function": {"name": "f"}}]);
        assert_eq!(
            param(check(twice, Value::Null, None)),
            "tools[1].function.name"
        );
        let bad_params = json!([{"type": "function", "function": {"name": "f", "parameters": []}}]);
        assert_eq!(
            param(check(bad_params, Value::Null, None)),
            "tools[0].function.parameters"
        );
        let unknown = json!({"type": "function", "function": {"name": "nope"}});
        assert_eq!(
            param(check(weather_tools(), unknown, None)),
            "tool_choice.function.name"
        );
        assert_eq!(
            param(check(weather_tools(), json!("always"), None)),
            "tool_choice"
        );
        assert_eq!(
            param(ToolRequest::check(None, Some(&json!("required")), None)),
            "tool_choice"
        );
    }

    fn message(value: Value) -> ChatMessageIn {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn tool_turns_are_checked_and_arguments_parsed() {
        let call = message(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{\"a\": [1]}"}}
        ]}));
        let (calls, id) = message_tool_fields(&call, 1).unwrap();
        assert_eq!(id, None);
        assert_eq!(
            calls,
            vec![ChatToolCall::function("call_9", "f", json!({"a": [1]}))]
        );

        let result = message(json!({"role": "tool", "content": "42"}));
        let err = message_tool_fields(&result, 2).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[2].tool_call_id"));
        let result = message(json!({"role": "tool", "content": "42", "tool_call_id": "call_9"}));
        assert_eq!(
            message_tool_fields(&result, 2).unwrap().1.as_deref(),
            Some("call_9")
        );

        let from_user = message(json!({"role": "user", "content": "x", "tool_calls": []}));
        let err = message_tool_fields(&from_user, 0).unwrap_err();
        assert_eq!(err.param.as_deref(), Some("messages[0].tool_calls"));
        let nameless =
            message(json!({"role": "assistant", "tool_calls": [{"id": "c", "function": {}}]}));
        let err = message_tool_fields(&nameless, 3).unwrap_err();
        assert_eq!(
            err.param.as_deref(),
            Some("messages[3].tool_calls[0].function.name")
        );
    }

    #[test]
    fn the_family_follows_the_template() {
        let llama = ChatTemplate::new(
            "{% if tools %}{{ '<|python_tag|>' }}{% endif %}{{ messages[0].content }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(ToolFamily::of_template(&llama), ToolFamily::Llama3);
        let qwen = ChatTemplate::new("{% if tools %}<tools>{% endif %}", "", "").unwrap();
        assert_eq!(ToolFamily::of_template(&qwen), ToolFamily::Hermes);
        // Knows no tools: rendered with the Hermes fallback, read as Hermes.
        let plain = ChatTemplate::new("{{ messages[0].content }} ipython", "", "").unwrap();
        assert_eq!(ToolFamily::of_template(&plain), ToolFamily::Hermes);
    }
}
