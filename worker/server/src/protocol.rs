//! The OpenAI wire schema: what clients send and what they get back.
//!
//! Request fields whose JSON type varies (`stop`, `prompt`, message `content`)
//! are kept as raw `Value`s here and checked in `params`, so a wrong shape gets
//! an error that says what was expected instead of serde's untagged-enum text.
//!
//! Every top-level field a client sends must mean something: a field of the
//! request struct, or one of the endpoint's [`FieldPolicy::ignored`] fields.
//! Anything else is refused (`params::parse_body`), so a client never gets
//! behaviour other than what it asked for without a word.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    /// A string, an array of `{"type": "text", "text": ...}` parts, or null
    /// (only for an assistant turn).
    #[serde(default)]
    pub content: Option<Value>,
    /// An assistant turn's calls: `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
    #[serde(default)]
    pub tool_calls: Option<Value>,
    /// A `tool` turn: the id of the call it answers.
    #[serde(default)]
    pub tool_call_id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// Declares the request structs with the fields they share written once.
///
/// The `common` block is the schema chat and completions have in common: every
/// struct after it gets those fields appended, as if written in it, plus a
/// `common()` method that borrows them as one [`CommonFields`] value.
///
/// Not a struct embedded with `#[serde(flatten)]`: serde deserializes a
/// flattened struct from a buffered copy of the map, out of
/// `serde_path_to_error`'s sight, so a wrong type there (`"max_tokens": "ten"`)
/// would lose the field name that the 400 reports as its `param`.
macro_rules! requests_with_common_fields {
    (
        $(#[$common_attr:meta])*
        common $common:ident $shared:tt
        $( $(#[$attr:meta])* pub struct $name:ident $own:tt )*
    ) => {
        requests_with_common_fields!(@view $(#[$common_attr])* $common $shared);
        $( requests_with_common_fields!(@request $common $shared $(#[$attr])* $name $own); )*
    };
    (@view $(#[$common_attr:meta])* $common:ident {
        $( $(#[$field_attr:meta])* pub $field:ident: $ty:ty, )*
    }) => {
        $(#[$common_attr])*
        #[derive(Debug, Clone, Copy)]
        pub struct $common<'a> {
            $( $(#[$field_attr])* pub $field: &'a $ty, )*
        }
    };
    (@request $common:ident {
        $( $(#[$field_attr:meta])* pub $field:ident: $ty:ty, )*
    } $(#[$attr:meta])* $name:ident { $($own:tt)* }) => {
        $(#[$attr])*
        pub struct $name {
            $($own)*
            $( $(#[$field_attr])* pub $field: $ty, )*
        }

        impl $name {
            /// The fields every request has, borrowed.
            pub fn common(&self) -> $common<'_> {
                $common { $( $field: &self.$field, )* }
            }
        }
    };
}

requests_with_common_fields! {
    /// The fields chat and completions share, borrowed from either request.
    common CommonFields {
        pub max_tokens: Option<i64>,
        pub temperature: Option<f64>,
        pub top_p: Option<f64>,
        /// Extension (vLLM-style): keep the `k` most likely tokens; 0 or -1 disables.
        pub top_k: Option<i64>,
        pub seed: Option<i64>,
        pub presence_penalty: Option<f64>,
        pub frequency_penalty: Option<f64>,
        /// A string, an array of strings, or null.
        pub stop: Option<Value>,
        /// Extension: token ids that end generation like EOS.
        pub stop_token_ids: Option<Vec<u32>>,
        /// Extension: keep generating past EOS until `max_tokens`.
        pub ignore_eos: Option<bool>,
        /// Choices per prompt, 1 to 16.
        pub n: Option<i64>,
        pub stream: Option<bool>,
        pub stream_options: Option<StreamOptions>,
        /// Extension (vLLM-style): drop tokens less likely than `min_p` times the top one.
        pub min_p: Option<f64>,
        /// Extension (vLLM-style): multiplicative penalty on tokens already seen; 1 disables.
        pub repetition_penalty: Option<f64>,
        /// An object of token id strings to a bias in [-100, 100].
        pub logit_bias: Option<Value>,
        /// `{"type": "text" | "json_object" | "json_schema", ...}`.
        pub response_format: Option<Value>,
        /// Extension (vLLM): a JSON Schema, as an object or as JSON text.
        pub guided_json: Option<Value>,
        /// Extension (vLLM): a regular expression the whole output matches.
        pub guided_regex: Option<String>,
        /// Extension (vLLM): a grammar in llguidance's Lark dialect.
        pub guided_grammar: Option<String>,
        /// Extension (vLLM): the output is exactly one of these strings.
        pub guided_choice: Option<Vec<String>>,
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct ChatCompletionRequest {
        pub model: String,
        pub messages: Vec<ChatMessageIn>,
        /// The newer name of `max_tokens`; wins when both are given.
        pub max_completion_tokens: Option<i64>,
        pub logprobs: Option<bool>,
        pub top_logprobs: Option<i64>,
        pub tools: Option<Value>,
        /// "none", "auto", "required" or `{"type": "function", "function": {"name": ...}}`.
        pub tool_choice: Option<Value>,
        pub parallel_tool_calls: Option<bool>,
    }

    #[derive(Debug, Clone, Deserialize)]
    pub struct CompletionRequest {
        pub model: String,
        /// A string, an array of token ids, or a batch: an array of strings or
        /// an array of arrays of token ids.
        pub prompt: Option<Value>,
        /// Candidates generated per prompt; the `n` most likely are returned.
        pub best_of: Option<i64>,
        /// Number of most likely alternatives to report per token.
        pub logprobs: Option<i64>,
        /// Prepend the prompt to each choice (with `logprobs`, its tokens' logprobs too).
        pub echo: Option<bool>,
        pub suffix: Option<String>,
    }
}

/// What an endpoint does with top-level fields that are not in its request struct.
#[derive(Debug, Clone, Copy)]
pub struct FieldPolicy {
    /// OpenAI fields accepted and ignored, because honouring them changes
    /// nothing a client can observe (`user`, `metadata`, ...). A field the
    /// server implements belongs in the request struct instead.
    pub ignored: &'static [&'static str],
    /// OpenAI fields this server does not implement: a 400 saying so.
    pub not_supported: &'static [&'static str],
}

/// A request body type and its endpoint's [`FieldPolicy`].
pub trait Request: serde::de::DeserializeOwned {
    const FIELDS: FieldPolicy;
}

impl Request for ChatCompletionRequest {
    const FIELDS: FieldPolicy = FieldPolicy {
        ignored: &[
            "user",
            "metadata",
            "store",
            "service_tier",
            "prompt_cache_key",
            "safety_identifier",
        ],
        not_supported: &[
            "audio",
            "modalities",
            "prediction",
            "functions",
            "function_call",
            "web_search_options",
            "reasoning_effort",
            "verbosity",
        ],
    };
}

impl Request for CompletionRequest {
    const FIELDS: FieldPolicy = FieldPolicy {
        ignored: &["user"],
        not_supported: &[],
    };
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PromptTokensDetails {
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
    pub prompt_tokens_details: PromptTokensDetails,
}

impl Usage {
    pub fn new(prompt_tokens: usize, cached_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

// ---- chat responses ----

#[derive(Debug, Clone, Serialize)]
pub struct ChatMessageOut {
    pub role: &'static str,
    /// Null when the answer was only tool calls.
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

/// One call the model made.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCallOut,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionCallOut {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A streamed piece of call `index`: its first carries `id`, `type` and the
/// name (with empty arguments), the rest argument text.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionCallDelta,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl ToolCallDelta {
    pub fn start(index: usize, id: String, name: String) -> Self {
        Self {
            index,
            id: Some(id),
            kind: Some("function"),
            function: FunctionCallDelta {
                name: Some(name),
                arguments: Some(String::new()),
            },
        }
    }

    pub fn arguments(index: usize, fragment: String) -> Self {
        Self {
            index,
            id: None,
            kind: None,
            function: FunctionCallDelta {
                name: None,
                arguments: Some(fragment),
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<ChatTopLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessageOut,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    pub system_fingerprint: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (as null until the last chunk) only with `include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    pub system_fingerprint: Option<String>,
}

// ---- completion responses ----

/// The legacy completions logprobs shape: parallel arrays, one entry per
/// token. With `echo` the prompt's tokens come first, and the very first has
/// null logprobs (nothing precedes it to predict it from).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<Option<f32>>,
    pub top_logprobs: Vec<Option<serde_json::Map<String, Value>>>,
    /// Byte offset of each token's text in the choice's `text`.
    pub text_offset: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    pub system_fingerprint: Option<String>,
}

// ---- models ----

#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub max_model_len: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
