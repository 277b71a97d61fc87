//! Text ↔ token ids, over the `tokenizers` crate, plus incremental, UTF-8-safe
//! detokenization for streaming.

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Tokenizers(String),
    #[error("tokenizer: {0}")]
    Unsupported(String),
    #[error("tokenizer vocabulary is malformed: {0}")]
    Malformed(String),
}

/// A byte-level BPE vocabulary in the form GGUF stores it
/// (`tokenizer.ggml.model == "gpt2"`): tokens by id, merges as `"a b"`, token
/// types, and the name of the pre-tokenizer (`tokenizer.ggml.pre`).
#[derive(Debug, Clone)]
pub struct ByteLevelBpeVocab {
    pub tokens: Vec<String>,
    /// llama.cpp token types by id (1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte); may be empty.
    pub token_types: Vec<i32>,
    pub merges: Vec<String>,
    /// `tokenizer.ggml.pre`; `None` means plain GPT-2.
    pub pre: Option<String>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos_token: bool,
}

const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Llama 3's split regex (llama.cpp pre "llama-bpe"): up to three digits per
/// piece, letters may carry one leading non-letter.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex: as Llama 3's but one digit per piece.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The pre-tokenizer HF uses for the model family llama.cpp names `pre`.
fn byte_level_pre_tokenizer(
    pre: Option<&str>,
) -> Result<tokenizers::PreTokenizerWrapper, TokenizerError> {
    use tokenizers::pre_tokenizers::{
        byte_level::ByteLevel, digits::Digits, sequence::Sequence, split::Split,
    };
    use tokenizers::{PreTokenizerWrapper as W, SplitDelimiterBehavior};
    let split = |regex: &str| -> Result<W, TokenizerError> {
        let split = Split::new(
            tokenizers::pre_tokenizers::split::SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        Ok(W::Sequence(Sequence::new(vec![
            W::Split(split),
            W::ByteLevel(ByteLevel::new(false, true, false)),
        ])))
    };
    match pre.unwrap_or("default") {
        // GPT-2's own regex lives inside the ByteLevel pre-tokenizer.
        "default" | "gpt2" | "gpt-2" => Ok(W::ByteLevel(ByteLevel::new(false, true, true))),
        // StarCoder-style vocabularies (SmolLM included) split every digit first.
        "smollm" | "starcoder" | "refact" | "codeshell" => Ok(W::Sequence(Sequence::new(vec![
            W::Digits(Digits::new(true)),
            W::ByteLevel(ByteLevel::new(false, true, true)),
        ]))),
        "llama-bpe" | "llama3" | "smaug-bpe" => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        other => Err(TokenizerError::Unsupported(format!(
            "pre-tokenizer \"{other}\" is not supported (supported: gpt2, smollm, starcoder, \
             refact, codeshell, llama-bpe, qwen2)"
        ))),
    }
}

/// A model's tokenizer with the special-token facts generation needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("add_bos_token", &self.add_bos_token)
            .finish()
    }
}

impl Tokenizer {
    /// `add_bos_token`: whether `encode` prepends BOS (GGUF `tokenizer.ggml.add_bos_token`,
    /// HF `add_bos_token`). The inner tokenizer must not add special tokens itself.
    pub fn new(
        inner: tokenizers::Tokenizer,
        bos_token_id: Option<u32>,
        eos_token_ids: Vec<u32>,
        add_bos_token: bool,
    ) -> Self {
        Self {
            inner: Arc::new(inner),
            bos_token_id,
            eos_token_ids,
            add_bos_token,
        }
    }

    /// Builds the HF-equivalent tokenizer of a byte-level BPE vocabulary (as in
    /// GGUF files): BPE over the tokens and merges, the pre-tokenizer named by
    /// `pre`, the byte-level decoder, and control tokens registered as special
    /// tokens so that `<|im_start|>` written in chat text encodes to its one id.
    pub fn from_byte_level_bpe(vocab: ByteLevelBpeVocab) -> Result<Self, TokenizerError> {
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::{decoders::byte_level::ByteLevel, AddedToken};

        let ids: Vocab = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let merges = vocab
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::Malformed(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let pre = vocab.pre.as_deref();
        let bpe = BPE::builder()
            .vocab_and_merges(ids, merges)
            .ignore_merges(matches!(pre, Some("llama-bpe" | "llama3")))
            .build()
            .map_err(|e| TokenizerError::Malformed(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(byte_level_pre_tokenizer(pre)?));
        inner.with_decoder(Some(ByteLevel::default()));
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            vocab
                .token_types
                .iter()
                .zip(&vocab.tokens)
                .filter(|(t, _)| **t == kind)
                .map(|(_, s)| AddedToken::from(s.clone(), special))
                .collect()
        };
        inner.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
        inner.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
        let n = vocab.tokens.len() as u32;
        for id in vocab.bos_token_id.iter().chain(&vocab.eos_token_ids) {
            if *id >= n {
                return Err(TokenizerError::Malformed(format!(
                    "special token id {id} is outside the vocabulary of {n} tokens"
                )));
            }
        }
        Ok(Self::new(
            inner,
            vocab.bos_token_id,
            vocab.eos_token_ids,
            vocab.add_bos_token,
        ))
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`. Special tokens written in the text (as chat templates
    /// render them) become their ids; BOS is prepended iff the model asks for it
    /// and the text does not already start with it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if self.add_bos_token {
            if let Some(bos) = self.bos_token_id {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// Text of `ids`; special tokens are dropped when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.inner
            .decode(ids, skip_special_tokens)
            .unwrap_or_default()
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    pub fn add_bos_token(&self) -> bool {
        self.add_bos_token
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// A decoder that turns a growing id sequence into text deltas.
    pub fn incremental(&self) -> IncrementalDecoder {
        IncrementalDecoder {
            tokenizer: self.clone(),
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }
}

/// Streams text as tokens arrive, never emitting half a UTF-8 character and
/// keeping the word-boundary spacing a whole-sequence decode would give.
///
/// It decodes a short window of already-emitted tokens together with the new
/// ones and emits only the text past the window's previous decode; while the
/// new text ends in an incomplete character (U+FFFD), it waits.
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Add one token; returns the newly completed text, possibly empty.
    pub fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true);
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], true);
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.starts_with(&prefix) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            delta
        } else {
            String::new()
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn flush(&mut self) -> String {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true);
        let full = self.tokenizer.decode(&self.ids[self.prefix_offset..], true);
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        if full.len() > prefix.len() && full.starts_with(&prefix) {
            full[prefix.len()..].to_string()
        } else {
            String::new()
        }
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}
