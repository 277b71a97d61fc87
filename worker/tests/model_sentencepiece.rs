//! SentencePiece (GGUF `tokenizer.ggml.model == "llama"`) vocabularies encode
//! exactly as Hugging Face's conversion of the same vocabulary does. The
//! fixture was produced by `fixtures/sentencepiece_tiny.py` with transformers'
//! `LlamaTokenizer` over merges from its `generate_merges`.

use serde::Deserialize;
use tandem_model::gguf::{GgufFile, MetadataValue};
use tandem_model::testing::{random_weights, save_gguf, tiny_config, TokenizerSource};
use tandem_model::tokenizer::{SentencePieceVocab, Tokenizer};
use tandem_model::{self as model, Architecture, ModelConfig};

#[derive(Deserialize)]
struct Fixture {
    tokens: Vec<String>,
    types: Vec<i32>,
    scores: Vec<f32>,
    texts: Vec<String>,
    ids: Vec<Vec<u32>>,
    decoded: Vec<String>,
}

fn fixture() -> Fixture {
    serde_json::from_str(include_str!("fixtures/sentencepiece_tiny.json")).unwrap()
}

#[test]
fn encodes_and_decodes_like_hf() {
    let fx = fixture();
    let t = Tokenizer::from_sentencepiece(SentencePieceVocab {
        tokens: fx.tokens.clone(),
        scores: fx.scores.clone(),
        token_types: fx.types.clone(),
        add_space_prefix: true,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        add_bos_token: false,
    })
    .unwrap();
    for ((text, ids), decoded) in fx.texts.iter().zip(&fx.ids).zip(&fx.decoded) {
        assert_eq!(&t.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(&t.decode(ids, false), decoded, "{text:?}");
    }
}

#[test]
fn gguf_with_a_sentencepiece_vocab_loads_and_adds_bos_by_default() {
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        vocab_size: fx.tokens.len(),
        ..tiny_config(Architecture::Llama)
    };
    let base = dir.path().join("base.gguf");
    save_gguf(&base, &cfg, &random_weights(&cfg, 3), TokenizerSource::Tiny).unwrap();
    // Swap the tiny byte-level vocabulary for the SentencePiece one, leaving
    // add_bos_token unset as older llama files do.
    let f = GgufFile::open(&base).unwrap();
    let mut meta: Vec<(String, MetadataValue)> = f
        .metadata
        .clone()
        .into_iter()
        .filter(|(k, _)| !k.starts_with("tokenizer.ggml."))
        .collect();
    meta.extend([
        (
            "tokenizer.ggml.model".into(),
            MetadataValue::String("llama".into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            MetadataValue::strings(fx.tokens.clone()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            MetadataValue::Array(
                tandem_model::gguf::ValueType::F32,
                fx.scores.iter().map(|s| MetadataValue::F32(*s)).collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            MetadataValue::i32s(fx.types.clone()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), MetadataValue::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), MetadataValue::U32(2)),
    ]);
    let tensors = f
        .tensors
        .iter()
        .map(|t| tandem_model::gguf::TensorData {
            name: t.name.clone(),
            shape: t.shape(),
            ggml_type: t.ggml_type,
            bytes: f.tensor_bytes(t).unwrap().to_vec(),
        })
        .collect::<Vec<_>>();
    let path = dir.path().join("spm.gguf");
    tandem_model::gguf::write_gguf(&path, &meta, &tensors).unwrap();

    let m = model::load(&path).unwrap();
    assert!(m.tokenizer.add_bos_token());
    let mut want = vec![1];
    want.extend(&fx.ids[0]);
    assert_eq!(m.tokenizer.encode(&fx.texts[0]).unwrap(), want);
}
