//! Grammars compiled against the real default model's vocabulary
//! (SmolLM2-135M-Instruct): the token bytes llguidance sees agree with the
//! tokenizer, and walking the masks can only produce text of the grammar.

use tandem_api::types::Grammar;
use tandem_guide::{Constraint, Guide, GuideError};
use tandem_model::{load_text, resolve, Tokenizer};

fn tokenizer() -> Tokenizer {
    let path = resolve(None).expect("the default model is in the cache (make model)");
    load_text(&path)
        .expect("the default model's tokenizer loads")
        .tokenizer
}

#[test]
fn token_bytes_concatenate_to_the_decoded_text() {
    let tok = tokenizer();
    let bytes = tok.token_bytes();
    assert_eq!(bytes.len(), tok.vocab_size());
    for text in [
        "Hello, world! {\"a\": [1, 2.5e3]}\n\ttabs",
        "naïve café — 東京 🚀",
        "  leading spaces and trailing  ",
    ] {
        let ids = tok.encode(text).unwrap();
        let joined: Vec<u8> = ids
            .iter()
            .flat_map(|&id| {
                bytes[id as usize]
                    .clone()
                    .expect("plain text has no specials")
            })
            .collect();
        assert_eq!(String::from_utf8(joined).unwrap(), tok.decode(&ids, false));
    }
    let im_start = tok.token_to_id("<|im_start|>").unwrap();
    assert_eq!(
        bytes[im_start as usize], None,
        "control tokens are not text"
    );
}

/// Follows the constraint greedily from a preference order over token ids
/// (a stand-in for a model): at each step the first allowed token of
/// `prefer` (cycled), else the lowest allowed id.
fn walk(tok: &Tokenizer, c: &mut Constraint, prefer: &[u32], max: usize) -> (String, bool) {
    let eos = tok.eos_token_ids()[0];
    let vocab = tok.vocab_size();
    let mut out = Vec::new();
    for step in 0..max {
        let mut logits = vec![0.0f32; vocab + 7];
        c.apply(&mut logits).unwrap();
        assert!(logits[vocab..].iter().all(|l| *l == f32::NEG_INFINITY));
        let allowed: Vec<u32> = (0..vocab as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        assert!(!allowed.is_empty(), "the mask allows nothing");
        let pick = prefer
            .iter()
            .cycle()
            .skip(step % prefer.len().max(1))
            .take(prefer.len())
            .copied()
            .find(|t| allowed.contains(t))
            .unwrap_or(allowed[0]);
        if pick == eos {
            return (tok.decode(&out, false), true);
        }
        c.advance(pick).unwrap();
        out.push(pick);
    }
    (tok.decode(&out, false), false)
}

#[test]
fn a_regex_admits_only_its_strings_and_ends_with_eos() {
    let tok = tokenizer();
    let guide = Guide::new(tok.clone());
    let mut c = guide.compile(&Grammar::Regex("(yes|no)!".into())).unwrap();
    let eos = tok.eos_token_ids()[0];
    let prefer: Vec<u32> = ["no", "!"]
        .iter()
        .map(|s| tok.encode(s).unwrap()[0])
        .chain([eos])
        .collect();
    let (text, ended) = walk(&tok, &mut c, &prefer, 20);
    assert!(ended, "EOS was allowed once the regex matched");
    assert_eq!(text, "no!");
    assert!(c.is_complete());
}

#[test]
fn a_json_schema_walk_yields_a_valid_document() {
    let tok = tokenizer();
    let guide = Guide::new(tok.clone());
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "kind": {"enum": ["cat", "dog"]},
            "tags": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            "owner": {
                "type": "object",
                "properties": {"age": {"type": "integer"}},
                "required": ["age"],
                "additionalProperties": false
            }
        },
        "required": ["name", "kind", "tags", "owner"],
        "additionalProperties": false
    });
    // A "model" that likes quotes, digits and letters: the grammar must still
    // steer it through every required field.
    let prefer: Vec<u32> = ["\"", "7", "a", "]", "}", "cat"]
        .iter()
        .map(|s| tok.encode(s).unwrap()[0])
        .collect();
    let mut c = guide
        .compile(&Grammar::JsonSchema(schema.to_string()))
        .unwrap();
    let (text, ended) = walk(&tok, &mut c, &prefer, 400);
    assert!(ended, "the document closed within 400 tokens: {text}");
    let doc: serde_json::Value = serde_json::from_str(&text).expect(&text);
    assert!(
        doc["name"].as_str().unwrap().chars().count() <= 12,
        "{text}"
    );
    assert!(
        ["cat", "dog"].contains(&doc["kind"].as_str().unwrap()),
        "{text}"
    );
    assert!(doc["tags"].as_array().unwrap().len() <= 3, "{text}");
    assert!(doc["owner"]["age"].is_i64(), "{text}");
    assert_eq!(doc.as_object().unwrap().len(), 4, "{text}");
}

#[test]
fn json_object_output_starts_with_a_brace() {
    let tok = tokenizer();
    let guide = Guide::new(tok.clone());
    let mut c = guide.compile(&Grammar::JsonObject).unwrap();
    let hello = tok.encode("Hello").unwrap()[0];
    assert!(!c.allows(hello).unwrap());
    let brace = tok.encode("{").unwrap()[0];
    assert!(c.allows(brace).unwrap());
    assert!(
        !c.allows(tok.eos_token_ids()[0]).unwrap(),
        "no EOS before a document"
    );
}

#[test]
fn bad_grammars_are_the_clients_error() {
    let guide = Guide::new(tokenizer());
    for (g, needle) in [
        (Grammar::JsonSchema("{not json".into()), "not JSON"),
        (Grammar::JsonSchema("[1]".into()), "must be a JSON object"),
        (Grammar::Regex("(unclosed".into()), ""),
        (Grammar::Lark("start: undefined_rule".into()), ""),
    ] {
        match guide.compile(&g) {
            Err(GuideError::Invalid { kind, message }) => {
                assert_eq!(kind, g.kind());
                assert!(message.contains(needle), "{message}");
            }
            other => panic!("{g:?} compiled: {other:?}"),
        }
    }
}

#[test]
fn a_token_outside_the_grammar_is_a_violation() {
    let tok = tokenizer();
    let guide = Guide::new(tok.clone());
    let mut c = guide.compile(&Grammar::Regex("[0-9]+".into())).unwrap();
    let letter = tok.encode("x").unwrap()[0];
    assert!(matches!(c.advance(letter), Err(GuideError::Violated(_))));
}
