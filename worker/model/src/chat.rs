//! Chat templates (Jinja, as shipped in GGUF metadata or `tokenizer_config.json`),
//! rendered with `minijinja` plus Python string-method compatibility.
//!
//! A template sees what Hugging Face's `apply_chat_template` passes it:
//! `messages` (assistant turns may carry `tool_calls`, `tool` turns a
//! `tool_call_id`), `tools` (OpenAI tool objects, or none), `add_generation_prompt`,
//! `bos_token` and `eos_token`; `tojson` formats like Python's `json.dumps`.
//!
//! Many templates know nothing of tools. For those, [`ChatTemplate::render_with_tools`]
//! rewrites the conversation into the Hermes style that most open models
//! recognise, using only the `system`, `user` and `assistant` roles (so templates
//! that reject other roles still render it):
//!
//! - the tools are listed, one JSON signature per line, inside `<tools></tools>`
//!   in a system block (appended to the conversation's own system message, or
//!   a system message of its own placed first), with the instruction to answer
//!   with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
//! - an assistant turn's tool calls become that text after its content;
//! - tool results become a `user` turn holding each result inside
//!   `<tool_response></tool_response>` (consecutive results share one turn).

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("chat template does not compile: {0}")]
    Compile(String),
    #[error("chat template failed to render: {0}")]
    Render(String),
}

/// One message of a conversation, as the template sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant turn's calls; absent from the template's view when empty,
    /// since templates test `'tool_calls' in message`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ChatToolCall>,
    /// A `tool` turn: the call it answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The author's name (OpenAI's `name` field), or a tool result's function.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// One call an assistant turn made, in the shape HF templates expect:
/// `{"id", "type": "function", "function": {"name", "arguments"}}` with
/// `arguments` a parsed JSON value rather than the wire's JSON text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: ChatFunctionCall,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatFunctionCall {
    pub name: String,
    pub arguments: Value,
}

impl ChatToolCall {
    pub fn function(id: impl Into<String>, name: impl Into<String>, arguments: Value) -> Self {
        Self {
            id: id.into(),
            kind: "function".to_string(),
            function: ChatFunctionCall {
                name: name.into(),
                arguments,
            },
        }
    }
}

/// A compiled chat template with the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

const TEMPLATE_NAME: &str = "chat";

impl ChatTemplate {
    pub fn new(
        source: impl Into<String>,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Result<Self, ChatTemplateError> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        // minijinja's own `tojson` is compact and HTML-escapes `<`; templates
        // were written against transformers' `json.dumps` formatting.
        env.add_filter("tojson", python_tojson);
        // HF templates are written for Jinja's trim_blocks/lstrip_blocks settings.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        Ok(Self {
            env,
            source,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template renders tools itself: its source mentions `tools`.
    /// Otherwise [`render_with_tools`](Self::render_with_tools) uses the
    /// Hermes-style rendering described in the module docs.
    pub fn knows_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The prompt text for `messages`; with `add_generation_prompt`, ends where
    /// the assistant's reply begins.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Like [`render`](Self::render), offering the model `tools` (OpenAI tool
    /// objects) when given. Tool calls and tool results in `messages` are
    /// rendered whether or not tools are offered.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        if self.knows_tools() {
            return self.render_raw(messages, tools, add_generation_prompt);
        }
        let uses_tools = tools.is_some_and(|t| !t.is_empty())
            || messages
                .iter()
                .any(|m| m.role == "tool" || !m.tool_calls.is_empty());
        if !uses_tools {
            return self.render_raw(messages, None, add_generation_prompt);
        }
        let rewritten = hermes_messages(messages, tools.unwrap_or_default());
        self.render_raw(&rewritten, None, add_generation_prompt)
    }

    fn render_raw(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Compile(e.to_string()))?;
        tmpl.render(context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| ChatTemplateError::Render(e.to_string()))
    }
}

/// The opening of the fallback's tool block, before the signatures.
const HERMES_TOOLS_INTRO: &str = "You may call functions to answer. Their signatures, one JSON \
     object per line:\n<tools>\n";

/// The close of the fallback's tool block, after the signatures.
const HERMES_TOOLS_OUTRO: &str = "</tools>\n\nTo call a function, reply with a JSON object \
     holding its name and its arguments inside <tool_call></tool_call> tags, one block per \
     call:\n<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>";

/// The conversation rewritten for a template that knows nothing of tools (see
/// the module docs).
fn hermes_messages(messages: &[ChatMessage], tools: &[Value]) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    let mut rest = messages;
    if !tools.is_empty() {
        let mut block = HERMES_TOOLS_INTRO.to_string();
        for tool in tools {
            block.push_str(&python_json(tool, None));
            block.push('\n');
        }
        block.push_str(HERMES_TOOLS_OUTRO);
        match messages.split_first() {
            Some((first, tail)) if first.role == "system" => {
                let mut system = first.clone();
                system.content = format!("{}\n\n{block}", first.content);
                out.push(system);
                rest = tail;
            }
            _ => out.push(ChatMessage::new("system", block)),
        }
    }
    for message in rest {
        if message.role == "tool" {
            let response = format!("<tool_response>\n{}\n</tool_response>", message.content);
            match out.last_mut() {
                // Results of one round of calls share one turn.
                Some(prev) if prev.role == "user" && prev.content.ends_with("</tool_response>") => {
                    prev.content.push('\n');
                    prev.content.push_str(&response);
                }
                _ => out.push(ChatMessage::new("user", response)),
            }
            continue;
        }
        let mut plain = ChatMessage::new(message.role.clone(), message.content.clone());
        plain.name = message.name.clone();
        for call in &message.tool_calls {
            if !plain.content.is_empty() {
                plain.content.push('\n');
            }
            plain.content.push_str(&hermes_tool_call(
                &call.function.name,
                &call.function.arguments,
            ));
        }
        out.push(plain);
    }
    out
}

/// One call as the fallback rendering shows it and Hermes-style models write it.
pub fn hermes_tool_call(name: &str, arguments: &Value) -> String {
    format!(
        "<tool_call>\n{{\"name\": {}, \"arguments\": {}}}\n</tool_call>",
        python_json(&Value::from(name), None),
        python_json(arguments, None),
    )
}

/// The `tojson` filter as transformers defines it: `json.dumps` with
/// `ensure_ascii=False`, so `", "`/`": "` separators, or `indent` spaces per level.
fn python_tojson(value: JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    // Non-ASCII text is always kept as is: transformers' `ensure_ascii=False` default.
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value).map_err(|e| {
        JinjaError::new(ErrorKind::InvalidOperation, "cannot serialize to JSON").with_source(e)
    })?;
    if sort_keys == Some(true) {
        json.sort_all_objects();
    }
    Ok(JinjaValue::from_safe_string(python_json(&json, indent)))
}

/// `value` as Python's `json.dumps(value, ensure_ascii=False, indent=indent)` writes it.
pub fn python_json(value: &Value, indent: Option<usize>) -> String {
    let mut out = String::new();
    write_python_json(&mut out, value, indent, 0);
    out
}

fn write_python_json(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_separator = if indent.is_some() { "," } else { ", " };
    match value {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                write_python_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_separator);
                }
                newline(out, depth + 1);
                out.push_str(&Value::from(key.as_str()).to_string());
                out.push_str(": ");
                write_python_json(out, item, indent, depth + 1);
            }
            newline(out, depth);
            out.push('}');
        }
        // Scalars and empty containers print the same in both.
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_generation_prompt() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m['content'].strip().upper() }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[ChatMessage::new("user", "  hi ")], false)
                .unwrap(),
            "HI"
        );
    }

    /// A template in the style of Llama 3.1's: it renders tools itself, with
    /// `tojson(indent=4)`, calls as `{"name", "parameters"}`, results as `ipython`.
    const LLAMA3_STYLE: &str = concat!(
        "{{ bos_token }}",
        "{% if tools is not none %}",
        "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n' }}",
        "{% for t in tools %}{{ t | tojson(indent=4) + '\\n' }}{% endfor %}",
        "{{ '<|eot_id|>' }}",
        "{% endif %}",
        "{% for m in messages %}",
        "{% if m.role == 'assistant' and 'tool_calls' in m %}",
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>' }}",
        "{% for c in m.tool_calls %}",
        "{{ '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + c.function.arguments | tojson + '}' }}",
        "{% endfor %}",
        "{{ '<|eom_id|>' }}",
        "{% elif m.role == 'tool' %}",
        "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}",
        "{% else %}",
        "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}",
        "{% endif %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    );

    fn weather_tool() -> Value {
        serde_json::json!({
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather <now> in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"]
                }
            }
        })
    }

    fn round_trip() -> Vec<ChatMessage> {
        let mut call = ChatMessage::new("assistant", "");
        call.tool_calls = vec![ChatToolCall::function(
            "call_1",
            "get_weather",
            serde_json::json!({"city": "Paris"}),
        )];
        let mut result = ChatMessage::new("tool", "{\"temp_c\": 21}");
        result.tool_call_id = Some("call_1".into());
        vec![ChatMessage::new("user", "Weather in Paris?"), call, result]
    }

    #[test]
    fn a_template_that_knows_tools_gets_them_and_the_tool_turns() {
        let t = ChatTemplate::new(LLAMA3_STYLE, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert!(t.knows_tools());
        let out = t
            .render_with_tools(&round_trip(), Some(&[weather_tool()]), true)
            .unwrap();
        let expected = concat!(
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n",
            "{\n    \"type\": \"function\",\n    \"function\": {\n",
            "        \"name\": \"get_weather\",\n",
            "        \"description\": \"Weather <now> in a city\",\n",
            "        \"parameters\": {\n            \"type\": \"object\",\n",
            "            \"properties\": {\n                \"city\": {\n",
            "                    \"type\": \"string\"\n                }\n            },\n",
            "            \"required\": [\n                \"city\"\n            ]\n",
            "        }\n    }\n}\n",
            "<|eot_id|>",
            "<|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>",
            "{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eom_id|>",
            "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp_c\": 21}<|eot_id|>",
            "<|start_header_id|>assistant<|end_header_id|>\n\n",
        );
        assert_eq!(out, expected);
        // Without tools the template's own `tools is not none` branch is skipped.
        let plain = t.render(&[ChatMessage::new("user", "Hi")], true).unwrap();
        assert!(!plain.contains("Environment"), "{plain}");
    }

    #[test]
    fn a_template_without_tools_gets_the_hermes_rendering() {
        let t = ChatTemplate::new(CHATML, "<|im_start|>", "<|im_end|>").unwrap();
        assert!(!t.knows_tools());
        let out = t
            .render_with_tools(&round_trip(), Some(&[weather_tool()]), true)
            .unwrap();
        let expected = concat!(
            "<|im_start|>system\n",
            "You may call functions to answer. Their signatures, one JSON object per line:\n",
            "<tools>\n",
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", ",
            "\"description\": \"Weather <now> in a city\", \"parameters\": ",
            "{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, ",
            "\"required\": [\"city\"]}}}\n",
            "</tools>\n\n",
            "To call a function, reply with a JSON object holding its name and its arguments ",
            "inside <tool_call></tool_call> tags, one block per call:\n",
            "<tool_call>\n{\"name\": \"function_name\", \"arguments\": {\"argument\": \"value\"}}\n</tool_call>",
            "<|im_end|>\n",
            "<|im_start|>user\nWeather in Paris?<|im_end|>\n",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\n",
            "<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response><|im_end|>\n",
            "<|im_start|>assistant\n",
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn the_hermes_rendering_joins_a_system_message_and_consecutive_results() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let mut messages = vec![ChatMessage::new("system", "Be brief.")];
        messages.extend(round_trip());
        messages[2].tool_calls.push(ChatToolCall::function(
            "call_2",
            "get_weather",
            serde_json::json!({"city": "Rome"}),
        ));
        let mut second = ChatMessage::new("tool", "{\"temp_c\": 25}");
        second.tool_call_id = Some("call_2".into());
        messages.push(second);
        let out = t
            .render_with_tools(&messages, Some(&[weather_tool()]), false)
            .unwrap();
        assert!(
            out.starts_with("<|im_start|>system\nBe brief.\n\nYou may call functions"),
            "{out}"
        );
        assert_eq!(out.matches("<|im_start|>system").count(), 1, "{out}");
        assert!(out.contains(
            "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>"
        ), "{out}");
        assert!(
            out.ends_with(concat!(
                "<|im_start|>user\n<tool_response>\n{\"temp_c\": 21}\n</tool_response>\n",
                "<tool_response>\n{\"temp_c\": 25}\n</tool_response><|im_end|>\n"
            )),
            "{out}"
        );
    }

    #[test]
    fn tool_turns_without_tools_offered_still_render_in_the_hermes_style() {
        let t = ChatTemplate::new(CHATML, "", "").unwrap();
        let out = t.render_with_tools(&round_trip(), None, true).unwrap();
        assert!(!out.contains("<tools>"), "{out}");
        assert!(out.contains("<|im_start|>user\n<tool_response>"), "{out}");
        assert!(!out.contains("<|im_start|>tool"), "{out}");
    }

    #[test]
    fn tojson_writes_like_python_json_dumps() {
        let t = ChatTemplate::new(
            "{{ v | tojson }}|{{ v | tojson(indent=2) }}|{{ v | tojson(sort_keys=true) }}|{{ e | tojson }}",
            "",
            "",
        )
        .unwrap();
        let out = t
            .env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(context! {
                v => serde_json::json!({"b": [1, "x<y"], "a": {}}),
                e => serde_json::json!([]),
            })
            .unwrap();
        assert_eq!(
            out,
            concat!(
                "{\"b\": [1, \"x<y\"], \"a\": {}}|",
                "{\n  \"b\": [\n    1,\n    \"x<y\"\n  ],\n  \"a\": {}\n}|",
                "{\"a\": {}, \"b\": [1, \"x<y\"]}|[]"
            )
        );
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "").unwrap();
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }
}
