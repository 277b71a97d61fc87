//! Constrained decoding: a request's [`Grammar`] compiled against the
//! model's vocabulary into a [`Constraint`] that says, before each sampled
//! token, which tokens keep the output inside the grammar.
//!
//! The work is llguidance's (the library vLLM, SGLang and llama.cpp use): an
//! Earley parser over a lexer, walked against a trie of the vocabulary's
//! token bytes. This crate gives it the vocabulary ([`Guide`], built once per
//! model on first use) and turns its masks into `-inf` logits.
//!
//! A mask is computed for the *next* token while the backend computes the
//! current step's logits ([`Constraint::prepare`] on another thread), so on
//! a GPU it costs the decode step nothing; [`Constraint::apply`] computes it
//! on the spot when nobody prepared it.

use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use tandem_api::types::Grammar;
use tandem_model::Tokenizer;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum GuideError {
    /// The grammar itself is wrong: the client's error.
    #[error("invalid {kind}: {message}")]
    Invalid { kind: &'static str, message: String },
    /// The model's vocabulary cannot be used for constrained decoding.
    #[error("constrained decoding is unavailable for this model: {0}")]
    Unavailable(String),
    /// A token the grammar does not allow reached the constraint (a peer
    /// that sampled without it), or the parser failed.
    #[error("the output left its grammar: {0}")]
    Violated(String),
}

/// A model's vocabulary as llguidance sees it. Cheap to create; the token
/// trie is built on first use and shared by every clone.
#[derive(Clone)]
pub struct Guide {
    tokenizer: Tokenizer,
    eos: Option<u32>,
    factory: Arc<OnceLock<Result<Arc<ParserFactory>, String>>>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("vocab_size", &self.tokenizer.vocab_size())
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Guide {
    pub fn new(tokenizer: Tokenizer) -> Self {
        let eos = tokenizer.eos_token_ids().first().copied();
        Self {
            tokenizer,
            eos,
            factory: Arc::new(OnceLock::new()),
        }
    }

    fn factory(&self) -> Result<&Arc<ParserFactory>, GuideError> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let factory = build_factory(&self.tokenizer, self.eos);
                if factory.is_ok() {
                    tracing::info!(
                        vocab = self.tokenizer.vocab_size(),
                        ms = started.elapsed().as_millis() as u64,
                        "grammar engine ready"
                    );
                }
                factory
            })
            .as_ref()
            .map_err(|e| GuideError::Unavailable(e.clone()))
    }

    /// Compiles `grammar` for a new request. Errors name what is wrong with
    /// the grammar (a 400 for the client).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, GuideError> {
        let factory = self.factory()?;
        let kind = grammar.kind();
        let invalid = |message: String| GuideError::Invalid { kind, message };
        let top = match grammar {
            Grammar::JsonObject => {
                TopLevelGrammar::from_json_schema(json_with_defaults(serde_json::json!({
                    "type": "object"
                })))
            }
            Grammar::JsonSchema(text) => {
                let schema: Value = serde_json::from_str(text)
                    .map_err(|e| invalid(format!("the schema is not JSON: {e}")))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err(invalid("the schema must be a JSON object".into()));
                }
                TopLevelGrammar::from_json_schema(json_with_defaults(schema))
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = factory
            .create_parser(top)
            .map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint {
            matcher,
            mask: None,
        })
    }
}

/// JSON output the way OpenAI's and most models' JSON looks (`{"a": 1, "b": 2}`):
/// fixed separators, no free whitespace a small model could loop in. A schema
/// with its own `x-guidance` options keeps them.
fn json_with_defaults(mut schema: Value) -> Value {
    if let Value::Object(map) = &mut schema {
        map.entry("x-guidance").or_insert(serde_json::json!({
            "whitespace_flexible": false,
            "item_separator": ", ",
            "key_separator": ": ",
        }));
    }
    schema
}

fn build_factory(tokenizer: &Tokenizer, eos: Option<u32>) -> Result<Arc<ParserFactory>, String> {
    let eos = eos.ok_or("the tokenizer names no end-of-sequence token")?;
    let words: Vec<Vec<u8>> = tokenizer
        .token_bytes()
        .into_iter()
        .enumerate()
        .map(|(id, bytes)| {
            bytes.unwrap_or_else(|| {
                // llguidance's spelling of a special token: 0xFF, then its name.
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend(
                    tokenizer
                        .id_to_token(id as u32)
                        .unwrap_or_default()
                        .into_bytes(),
                );
                b
            })
        })
        .collect();
    let mut info = TokRxInfo::new(words.len() as u32, eos);
    info.tok_bos = tokenizer.bos_token_id();
    let trie = TokTrie::from(&info, &words);
    let env: TokEnv = Arc::new(VocabEnv {
        trie,
        tokenizer: tokenizer.clone(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    // Parser diagnostics go to the request's error, not to stderr.
    factory.quiet();
    Ok(Arc::new(factory))
}

struct VocabEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for VocabEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .inner()
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// Sets each logit whose bit is clear in `allowed` (bit `t % 32` of word
/// `t / 32`; tokens past the bitset count as clear) to `-inf`.
pub fn mask_logits(logits: &mut [f32], allowed: &[u32]) {
    for (w, chunk) in logits.chunks_mut(32).enumerate() {
        let bits = allowed.get(w).copied().unwrap_or(0);
        if bits == u32::MAX {
            continue;
        }
        for (i, l) in chunk.iter_mut().enumerate() {
            if bits & (1 << i) == 0 {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// One request's grammar state.
pub struct Constraint {
    matcher: Matcher,
    /// Allowed next tokens, when already computed for the coming step.
    mask: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("prepared", &self.mask.is_some())
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Whether the next token's mask still has to be computed.
    pub fn needs_mask(&self) -> bool {
        self.mask.is_none()
    }

    /// Computes the next token's mask now (on whatever thread calls it), so
    /// that [`Constraint::apply`] only has to read it.
    pub fn prepare(&mut self) -> Result<(), GuideError> {
        if self.mask.is_none() {
            let mask = self
                .matcher
                .compute_mask_or_eos()
                .map_err(|e| GuideError::Violated(e.to_string()))?;
            self.mask = Some(mask);
        }
        Ok(())
    }

    /// Sets every logit the grammar forbids to `-inf`. Logits beyond the
    /// tokenizer's vocabulary (padding rows of the output layer) are never
    /// allowed.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), GuideError> {
        mask_logits(logits, self.allowed()?);
        Ok(())
    }

    /// The next token's allowed set as a bitset (bit `t % 32` of word
    /// `t / 32`), computing it if needed; tokens past its end (padding rows
    /// of the output layer) are not allowed.
    pub fn allowed(&mut self) -> Result<&[u32], GuideError> {
        self.prepare()?;
        Ok(self.mask.as_ref().expect("prepared").as_slice())
    }

    /// Whether `token` is allowed next (computes the mask if needed).
    pub fn allows(&mut self, token: u32) -> Result<bool, GuideError> {
        self.prepare()?;
        Ok(self.mask.as_ref().expect("prepared").is_allowed(token))
    }

    /// Moves past a sampled token; the next mask is computed afresh.
    pub fn advance(&mut self, token: u32) -> Result<(), GuideError> {
        self.mask = None;
        if self.matcher.is_stopped() && !self.matcher.is_error() {
            // Complete: only EOS was allowed, and EOS ends the request.
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GuideError::Violated(e.to_string()))
    }

    /// Whether the output so far is a complete sentence of the grammar.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_accepting().unwrap_or(false) || self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_defaults_keep_a_schemas_own_options() {
        let with = json_with_defaults(serde_json::json!({"x-guidance": {"lenient": true}}));
        assert_eq!(with["x-guidance"], serde_json::json!({"lenient": true}));
        let without = json_with_defaults(serde_json::json!({"type": "object"}));
        assert_eq!(without["x-guidance"]["whitespace_flexible"], false);
    }
}
