//! Structured-output fields → the one grammar the engine enforces.
//!
//! OpenAI's `response_format` and vLLM's `guided_*` extensions all say what
//! shape the output must have, so a request may give at most one of them. Only
//! shapes are checked here; the engine compiles the grammar against the
//! vocabulary (llguidance) and refuses one it cannot compile.

use serde_json::{Map, Value};

use super::error::ApiError;
use super::params::json_type_name;
use super::protocol::CommonFields;
use tandem_api::types::Grammar;

/// The grammar a request's output must follow, if it asks for one.
pub fn grammar(f: CommonFields<'_>) -> Result<Option<Grammar>, ApiError> {
    let mut given: Vec<(&'static str, Grammar)> = Vec::new();
    if let Some(format) = f.response_format {
        if let Some(grammar) = response_format(format)? {
            given.push(("response_format", grammar));
        }
    }
    if let Some(schema) = f.guided_json {
        if !schema.is_null() {
            given.push(("guided_json", guided_json(schema)?));
        }
    }
    if let Some(regex) = f.guided_regex {
        given.push((
            "guided_regex",
            Grammar::Regex(non_empty(regex, "guided_regex")?),
        ));
    }
    if let Some(lark) = f.guided_grammar {
        given.push((
            "guided_grammar",
            Grammar::Lark(non_empty(lark, "guided_grammar")?),
        ));
    }
    if let Some(choices) = f.guided_choice {
        given.push(("guided_choice", Grammar::Lark(choice_grammar(choices)?)));
    }
    match given.len() {
        0 | 1 => Ok(given.pop().map(|(_, grammar)| grammar)),
        _ => {
            let names: Vec<String> = given.iter().map(|(name, _)| format!("`{name}`")).collect();
            Err(ApiError::invalid_param(
                given[1].0,
                format!(
                    "Only one output constraint may be given per request; got {}.",
                    names.join(" and ")
                ),
            ))
        }
    }
}

/// `{"type": "text"}` (no constraint), `{"type": "json_object"}` or
/// `{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}`.
fn response_format(format: &Value) -> Result<Option<Grammar>, ApiError> {
    let object = match format {
        Value::Null => return Ok(None),
        Value::Object(object) => object,
        other => {
            return Err(ApiError::invalid_param(
                "response_format",
                format!(
                "response_format must be an object such as {{\"type\": \"json_object\"}}, got {}.",
                json_type_name(other)
            ),
            ))
        }
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(other) => {
            return Err(ApiError::invalid_param(
                "response_format.type",
                format!(
                    "response_format.type must be a string, got {}.",
                    json_type_name(other)
                ),
            ))
        }
        None => {
            return Err(ApiError::invalid_param(
                "response_format.type",
                "response_format.type is missing; expected text, json_object or json_schema.",
            ))
        }
    };
    match kind {
        "text" => {
            only_keys(object, &["type"], "response_format")?;
            Ok(None)
        }
        "json_object" => {
            only_keys(object, &["type"], "response_format")?;
            Ok(Some(Grammar::JsonObject))
        }
        "json_schema" => {
            only_keys(object, &["type", "json_schema"], "response_format")?;
            json_schema_format(object.get("json_schema")).map(Some)
        }
        other => Err(ApiError::invalid_param(
            "response_format.type",
            format!(
                "response_format.type must be text, json_object or json_schema, got `{other}`."
            ),
        )),
    }
}

fn json_schema_format(spec: Option<&Value>) -> Result<Grammar, ApiError> {
    const PARAM: &str = "response_format.json_schema";
    let spec = match spec {
        Some(Value::Object(spec)) => spec,
        Some(other) => {
            return Err(ApiError::invalid_param(
                PARAM,
                format!(
                    "{PARAM} must be an object with a `schema`, got {}.",
                    json_type_name(other)
                ),
            ))
        }
        None => {
            return Err(ApiError::invalid_param(
                PARAM,
                "response_format of type json_schema needs a `json_schema` object.",
            ))
        }
    };
    only_keys(spec, &["name", "description", "schema", "strict"], PARAM)?;
    for (key, wanted, ok) in [
        (
            "name",
            "a string",
            spec.get("name").is_none_or(Value::is_string),
        ),
        (
            "description",
            "a string",
            spec.get("description").is_none_or(Value::is_string),
        ),
        (
            "strict",
            "a boolean or null",
            spec.get("strict")
                .is_none_or(|s| s.is_boolean() || s.is_null()),
        ),
    ] {
        if !ok {
            return Err(ApiError::invalid_param(
                format!("{PARAM}.{key}"),
                format!("{PARAM}.{key} must be {wanted}."),
            ));
        }
    }
    match spec.get("schema") {
        Some(schema @ Value::Object(_)) => Ok(Grammar::JsonSchema(schema.to_string())),
        Some(other) => Err(ApiError::invalid_param(
            format!("{PARAM}.schema"),
            format!(
                "{PARAM}.schema must be a JSON Schema object, got {}.",
                json_type_name(other)
            ),
        )),
        None => Err(ApiError::invalid_param(
            format!("{PARAM}.schema"),
            format!("{PARAM}.schema is missing; give the JSON Schema the output must follow."),
        )),
    }
}

/// A JSON Schema given as an object, or as the text of one.
fn guided_json(schema: &Value) -> Result<Grammar, ApiError> {
    let not_a_schema = |got: &str| {
        ApiError::invalid_param(
            "guided_json",
            format!("guided_json must be a JSON Schema object or its JSON text, got {got}."),
        )
    };
    match schema {
        Value::Object(_) => Ok(Grammar::JsonSchema(schema.to_string())),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(_)) => Ok(Grammar::JsonSchema(text.clone())),
            Ok(other) => Err(not_a_schema(&format!(
                "text holding {}",
                json_type_name(&other)
            ))),
            Err(e) => Err(not_a_schema(&format!("text that is not JSON ({e})"))),
        },
        other => Err(not_a_schema(json_type_name(other))),
    }
}

fn non_empty(text: &str, param: &str) -> Result<String, ApiError> {
    if text.is_empty() {
        Err(ApiError::invalid_param(
            param,
            format!("{param} must not be empty."),
        ))
    } else {
        Ok(text.to_string())
    }
}

/// A Lark grammar whose only sentences are `choices`.
fn choice_grammar(choices: &[String]) -> Result<String, ApiError> {
    if choices.is_empty() {
        return Err(ApiError::invalid_param(
            "guided_choice",
            "guided_choice must hold at least one string.",
        ));
    }
    if let Some(i) = choices.iter().position(String::is_empty) {
        return Err(ApiError::invalid_param(
            format!("guided_choice[{i}]"),
            format!("guided_choice[{i}] is empty; every choice must be a non-empty string."),
        ));
    }
    let alternatives: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
    Ok(format!("start: {}\n", alternatives.join(" | ")))
}

/// `text` as a Lark string literal, which llguidance reads with JSON's escapes.
/// Control characters and DEL are escaped: its lexer takes neither raw.
fn lark_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() && (c as u32) < 0x80 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// 400 naming the first key of `object` outside `allowed`.
fn only_keys(object: &Map<String, Value>, allowed: &[&str], param: &str) -> Result<(), ApiError> {
    match object.keys().find(|k| !allowed.contains(&k.as_str())) {
        None => Ok(()),
        Some(key) => Err(ApiError::invalid_param(
            format!("{param}.{key}"),
            format!(
                "Unknown field `{key}` in {param}; expected {}.",
                allowed
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::CompletionRequest;
    use serde_json::json;

    fn grammar_of(fields: Value) -> Result<Option<Grammar>, ApiError> {
        let mut body = json!({"model": "m", "prompt": "x"});
        for (k, v) in fields.as_object().unwrap() {
            body[k] = v.clone();
        }
        let req: CompletionRequest = serde_json::from_value(body).unwrap();
        grammar(req.common())
    }

    fn param_of(fields: Value) -> String {
        grammar_of(fields).unwrap_err().param.unwrap()
    }

    #[test]
    fn text_or_nothing_is_no_constraint() {
        assert_eq!(grammar_of(json!({})).unwrap(), None);
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "text"}})).unwrap(),
            None
        );
        assert_eq!(grammar_of(json!({"response_format": null})).unwrap(), None);
    }

    #[test]
    fn json_object_and_json_schema() {
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "json_object"}})).unwrap(),
            Some(Grammar::JsonObject)
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let got = grammar_of(json!({"response_format": {
            "type": "json_schema",
            "json_schema": {"name": "thing", "schema": schema, "strict": true}
        }}))
        .unwrap();
        let Some(Grammar::JsonSchema(text)) = got else {
            panic!("expected a JSON schema, got {got:?}")
        };
        assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), schema);
    }

    #[test]
    fn malformed_response_formats_name_the_field() {
        assert_eq!(
            param_of(json!({"response_format": "json"})),
            "response_format"
        );
        assert_eq!(
            param_of(json!({"response_format": {}})),
            "response_format.type"
        );
        assert_eq!(
            param_of(json!({"response_format": {"type": "yaml"}})),
            "response_format.type"
        );
        assert_eq!(
            param_of(json!({"response_format": {"type": "json_schema"}})),
            "response_format.json_schema"
        );
        assert_eq!(
            param_of(
                json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}})
            ),
            "response_format.json_schema.schema"
        );
        assert_eq!(
            param_of(
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}})
            ),
            "response_format.json_schema.schema"
        );
        assert_eq!(
            param_of(
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}})
            ),
            "response_format.json_schema.strict"
        );
        assert_eq!(
            param_of(
                json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {}, "extra": 1}}})
            ),
            "response_format.json_schema.extra"
        );
        assert_eq!(
            param_of(json!({"response_format": {"type": "json_object", "schema": {}}})),
            "response_format.schema"
        );
    }

    #[test]
    fn guided_fields_map_to_their_grammars() {
        let schema = json!({"type": "string", "maxLength": 3});
        assert_eq!(
            grammar_of(json!({"guided_json": schema})).unwrap(),
            Some(Grammar::JsonSchema(schema.to_string()))
        );
        assert_eq!(
            grammar_of(json!({"guided_json": "{\"type\": \"string\"}"})).unwrap(),
            Some(Grammar::JsonSchema("{\"type\": \"string\"}".into()))
        );
        assert_eq!(param_of(json!({"guided_json": "[1]"})), "guided_json");
        assert_eq!(param_of(json!({"guided_json": "{not json"})), "guided_json");
        assert_eq!(param_of(json!({"guided_json": 3})), "guided_json");
        assert_eq!(
            grammar_of(json!({"guided_regex": "[0-9]+"})).unwrap(),
            Some(Grammar::Regex("[0-9]+".into()))
        );
        assert_eq!(param_of(json!({"guided_regex": ""})), "guided_regex");
        assert_eq!(
            grammar_of(json!({"guided_grammar": "start: \"a\"+"})).unwrap(),
            Some(Grammar::Lark("start: \"a\"+".into()))
        );
        assert_eq!(param_of(json!({"guided_grammar": ""})), "guided_grammar");
    }

    #[test]
    fn guided_choice_is_a_lark_alternation_with_escaped_literals() {
        assert_eq!(
            grammar_of(json!({"guided_choice": ["yes", "no"]})).unwrap(),
            Some(Grammar::Lark("start: \"yes\" | \"no\"\n".into()))
        );
        assert_eq!(
            lark_string("say \"hi\"\\\n\u{7f}é"),
            "\"say \\\"hi\\\"\\\\\\u000a\\u007fé\""
        );
        // The escaped literal is JSON-decodable back to the choice, as llguidance reads it.
        let text = "tab\there \"q\" \\ end\u{1}";
        assert_eq!(
            serde_json::from_str::<String>(&lark_string(text)).unwrap(),
            text
        );
        assert_eq!(param_of(json!({"guided_choice": []})), "guided_choice");
        assert_eq!(
            param_of(json!({"guided_choice": ["a", ""]})),
            "guided_choice[1]"
        );
    }

    #[test]
    fn at_most_one_constraint() {
        let err = grammar_of(json!({
            "response_format": {"type": "json_object"},
            "guided_regex": "a+"
        }))
        .unwrap_err();
        assert_eq!(err.param.as_deref(), Some("guided_regex"));
        assert!(err.message.contains("Only one"), "{}", err.message);
        // The later one in this module's order is named.
        assert_eq!(
            param_of(json!({"guided_choice": ["a"], "guided_grammar": "start: \"a\""})),
            "guided_choice"
        );
        // A text response_format is no constraint, so a guided field may join it.
        assert_eq!(
            grammar_of(json!({"response_format": {"type": "text"}, "guided_regex": "a"})).unwrap(),
            Some(Grammar::Regex("a".into()))
        );
    }
}
