//! Text ↔ token ids, over the `tokenizers` crate, plus incremental, UTF-8-safe
//! detokenization for streaming.

use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer: {0}")]
    Tokenizers(String),
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
