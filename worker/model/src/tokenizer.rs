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

/// A SentencePiece BPE vocabulary in the form GGUF stores it
/// (`tokenizer.ggml.model == "llama"`): tokens with scores and types, no merges.
#[derive(Debug, Clone)]
pub struct SentencePieceVocab {
    pub tokens: Vec<String>,
    /// Merge priority of each token (higher merges first).
    pub scores: Vec<f32>,
    /// llama.cpp token types by id, as in [`ByteLevelBpeVocab::token_types`].
    pub token_types: Vec<i32>,
    /// Prepend "▁" to the text (`tokenizer.ggml.add_space_prefix`, default true).
    pub add_space_prefix: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub add_bos_token: bool,
}

const TOKEN_TYPE_UNKNOWN: i32 = 2;
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

fn check_special_ids(n: usize, bos: Option<u32>, eos: &[u32]) -> Result<(), TokenizerError> {
    for id in bos.iter().chain(eos) {
        if *id as usize >= n {
            return Err(TokenizerError::Malformed(format!(
                "special token id {id} is outside the vocabulary of {n} tokens"
            )));
        }
    }
    Ok(())
}

/// The BPE merges equivalent to SentencePiece's score-driven merging, in the
/// order HF's `generate_merges` gives them: each way a token splits into two
/// tokens is a merge, ranked by the merged token's score, then by longer left
/// piece, then longer right piece; remaining ties keep vocabulary order.
fn merges_from_scores(
    tokens: &[String],
    scores: &[f32],
    ids: &tokenizers::models::bpe::Vocab,
) -> Vec<(String, String)> {
    let mut merges: Vec<(String, String, f32)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let mut local: Vec<(u32, u32, &str, &str)> = token
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = token.split_at(at);
                Some((*ids.get(l)?, *ids.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(l, r, _, _)| (l, r));
        merges.extend(
            local
                .into_iter()
                .map(|(_, _, l, r)| (l.to_string(), r.to_string(), score)),
        );
    }
    // Descending by (score, left length, right length); stable, so equal keys
    // keep vocabulary order.
    merges.sort_by(|a, b| {
        let key = |m: &(String, String, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0)
            .then(kb.1.cmp(&ka.1))
            .then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l, r)).collect()
}

/// GPT-2's byte-level alphabet: the printable character each byte is
/// written as inside a byte-level BPE token, inverted.
fn gpt2_unicode_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                let c = char::from_u32(next).expect("a valid code point");
                next += 1;
                c
            };
            (c, b)
        })
        .collect()
}

/// A SentencePiece token's bytes: `▁` is a space, `<0xNN>` is byte NN.
fn sentencepiece_bytes(token: &str) -> Vec<u8> {
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            if hex.len() == 2 {
                return vec![b];
            }
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
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
        use tokenizers::decoders::byte_level::ByteLevel;
        use tokenizers::models::bpe::{Vocab, BPE};

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
        Self::with_gguf_specials(
            inner,
            GgufSpecials {
                tokens: &vocab.tokens,
                token_types: &vocab.token_types,
                bos_token_id: vocab.bos_token_id,
                eos_token_ids: vocab.eos_token_ids.clone(),
                add_bos_token: vocab.add_bos_token,
            },
            false,
        )
    }

    /// Builds the tokenizer HF derives for a SentencePiece BPE vocabulary
    /// (Llama 2, Mistral): BPE whose merges are recovered from the token
    /// scores (every split of a token into two tokens, ranked by the token's
    /// score), byte fallback to the `<0xNN>` tokens, "▁" for spaces.
    pub fn from_sentencepiece(vocab: SentencePieceVocab) -> Result<Self, TokenizerError> {
        use tokenizers::decoders::{
            byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, strip::Strip,
        };
        use tokenizers::models::bpe::{Vocab, BPE};
        use tokenizers::normalizers::replace::Replace;
        use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
        use tokenizers::DecoderWrapper;

        if vocab.scores.len() != vocab.tokens.len() {
            return Err(TokenizerError::Malformed(format!(
                "{} scores for {} tokens",
                vocab.scores.len(),
                vocab.tokens.len()
            )));
        }
        let ids: Vocab = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let merges = merges_from_scores(&vocab.tokens, &vocab.scores, &ids);
        let mut builder = BPE::builder()
            .vocab_and_merges(ids, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        let unk = vocab
            .token_types
            .iter()
            .position(|t| *t == TOKEN_TYPE_UNKNOWN)
            .map(|i| vocab.tokens[i].clone());
        if let Some(unk) = unk {
            builder = builder.unk_token(unk);
        }
        let bpe = builder
            .build()
            .map_err(|e| TokenizerError::Malformed(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let scheme = if vocab.add_space_prefix {
            PrependScheme::First
        } else {
            PrependScheme::Never
        };
        inner.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
        let mut decoders = vec![
            DecoderWrapper::Replace(
                Replace::new("▁", " ").map_err(|e| TokenizerError::Tokenizers(e.to_string()))?,
            ),
            DecoderWrapper::ByteFallback(ByteFallback::new()),
            DecoderWrapper::Fuse(Fuse::new()),
        ];
        if vocab.add_space_prefix {
            decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
        }
        inner.with_decoder(Some(Sequence::new(decoders)));
        Self::with_gguf_specials(
            inner,
            GgufSpecials {
                tokens: &vocab.tokens,
                token_types: &vocab.token_types,
                bos_token_id: vocab.bos_token_id,
                eos_token_ids: vocab.eos_token_ids.clone(),
                add_bos_token: vocab.add_bos_token,
            },
            true,
        )
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

    /// Every token's bytes, by id, as the text the tokenizer decodes them
    /// to: what a constrained-decoding engine matches grammars against.
    /// Special (control) tokens come back as `None`: they are not text.
    ///
    /// Byte-level vocabularies (GPT-2, Llama 3, Qwen, SmolLM) spell each
    /// byte as one printable character; SentencePiece vocabularies spell a
    /// space `▁` and raw bytes `<0xNN>`. Which one applies is read from the
    /// tokenizer's decoder.
    pub fn token_bytes(&self) -> Vec<Option<Vec<u8>>> {
        let specials: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let byte_level = self
            .inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|json| json.contains("\"ByteLevel\""));
        let unicode_to_byte = byte_level.then(gpt2_unicode_to_byte);
        (0..self.vocab_size() as u32)
            .map(|id| {
                if specials.contains(&id) {
                    return None;
                }
                let token = self.inner.id_to_token(id)?;
                Some(match &unicode_to_byte {
                    Some(table) => token
                        .chars()
                        .flat_map(|c| match table.get(&c) {
                            Some(&b) => vec![b],
                            // Not a byte-level character (an added plain token).
                            None => c.to_string().into_bytes(),
                        })
                        .collect(),
                    None => sentencepiece_bytes(&token),
                })
            })
            .collect()
    }

    /// Registers a GGUF vocabulary's added tokens (control → special, user-defined →
    /// plain) and checks and records its BOS/EOS facts; shared by every GGUF
    /// tokenizer model. `all_unnormalized` keeps even user-defined tokens out of
    /// normalization (SentencePiece); otherwise the `tokenizers` default applies.
    fn with_gguf_specials(
        mut inner: tokenizers::Tokenizer,
        specials: GgufSpecials<'_>,
        all_unnormalized: bool,
    ) -> Result<Self, TokenizerError> {
        use tokenizers::AddedToken;
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            specials
                .token_types
                .iter()
                .zip(specials.tokens)
                .filter(|(t, _)| **t == kind)
                .map(|(_, s)| {
                    let token = AddedToken::from(s.clone(), special);
                    if all_unnormalized {
                        token.normalized(false)
                    } else {
                        token
                    }
                })
                .collect()
        };
        inner.add_special_tokens(&added(TOKEN_TYPE_CONTROL, true));
        inner.add_tokens(&added(TOKEN_TYPE_USER_DEFINED, false));
        check_special_ids(
            specials.tokens.len(),
            specials.bos_token_id,
            &specials.eos_token_ids,
        )?;
        Ok(Self::new(
            inner,
            specials.bos_token_id,
            specials.eos_token_ids,
            specials.add_bos_token,
        ))
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

/// What every GGUF tokenizer model shares besides its vocabulary model.
struct GgufSpecials<'a> {
    tokens: &'a [String],
    token_types: &'a [i32],
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    add_bos_token: bool,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{tiny_vocab, TINY_TOKENIZER_VOCAB};

    fn pieces(t: &Tokenizer, text: &str) -> Vec<String> {
        use tokenizers::PreTokenizer;
        let mut pre = tokenizers::PreTokenizedString::from(text);
        t.inner()
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut pre)
            .unwrap();
        pre.get_splits(
            tokenizers::OffsetReferential::Original,
            tokenizers::OffsetType::Byte,
        )
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect()
    }

    fn with_pre(pre: &str) -> Result<Tokenizer, TokenizerError> {
        let mut v = tiny_vocab(TINY_TOKENIZER_VOCAB);
        v.pre = Some(pre.to_string());
        Tokenizer::from_byte_level_bpe(v)
    }

    #[test]
    fn each_pre_tokenizer_splits_digits_like_its_model_family() {
        let text = "Hi 12345 you're\n\nok";
        // Byte-level pieces: a space shows as "Ġ", a newline as "Ċ".
        let cases = [
            ("gpt2", vec!["Hi", "Ġ12345", "Ġyou", "'re", "Ċ", "Ċ", "ok"]),
            (
                "smollm",
                vec![
                    "Hi", "Ġ", "1", "2", "3", "4", "5", "Ġyou", "'re", "Ċ", "Ċ", "ok",
                ],
            ),
            (
                "llama-bpe",
                vec!["Hi", "Ġ", "123", "45", "Ġyou", "'re", "ĊĊ", "ok"],
            ),
            (
                "qwen2",
                vec![
                    "Hi", "Ġ", "1", "2", "3", "4", "5", "Ġyou", "'re", "ĊĊ", "ok",
                ],
            ),
        ];
        for (pre, want) in cases {
            let t = with_pre(pre).unwrap();
            assert_eq!(pieces(&t, text), want, "pre = {pre}");
            assert_eq!(
                t.decode(&t.encode(text).unwrap(), false),
                text,
                "pre = {pre}"
            );
        }
    }

    #[test]
    fn unknown_pre_tokenizers_and_bad_merges_are_named() {
        let err = with_pre("jais").unwrap_err().to_string();
        assert!(
            err.contains("\"jais\"") && err.contains("not supported"),
            "{err}"
        );
        let mut v = tiny_vocab(TINY_TOKENIZER_VOCAB);
        v.merges.push("nospace".into());
        let err = Tokenizer::from_byte_level_bpe(v).unwrap_err().to_string();
        assert!(err.contains("nospace"), "{err}");
        let mut v = tiny_vocab(TINY_TOKENIZER_VOCAB);
        v.eos_token_ids = vec![100_000];
        let err = Tokenizer::from_byte_level_bpe(v).unwrap_err().to_string();
        assert!(err.contains("100000"), "{err}");
    }
}
