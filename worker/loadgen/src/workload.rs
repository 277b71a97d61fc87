//! What the load generator sends: prompt and output lengths, synthetic
//! prompts, and prompts read from a JSONL file.

use std::path::Path;
use std::str::FromStr;

use rand::Rng;
use serde_json::Value;

use super::BenchError;

/// A length distribution: `512` (fixed) or `uniform:A:B` (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthSpec {
    Fixed(usize),
    Uniform(usize, usize),
}

impl LengthSpec {
    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        match *self {
            Self::Fixed(n) => n,
            Self::Uniform(a, b) => rng.random_range(a..=b),
        }
    }
}

impl FromStr for LengthSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let positive = |v: &str| -> Result<usize, String> {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!("`{v}` is not a positive token count")),
            }
        };
        if let Some(range) = s.strip_prefix("uniform:") {
            let (a, b) = range
                .split_once(':')
                .ok_or_else(|| format!("`{s}`: expected uniform:MIN:MAX"))?;
            let (a, b) = (positive(a)?, positive(b)?);
            if a > b {
                return Err(format!("`{s}`: MIN {a} is above MAX {b}"));
            }
            return Ok(Self::Uniform(a, b));
        }
        positive(s)
            .map(Self::Fixed)
            .map_err(|e| format!("{e}; expected N or uniform:MIN:MAX"))
    }
}

/// One request's input.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    /// OpenAI chat messages, sent as given (chat endpoint only).
    Messages(Vec<Value>),
}

/// Common short English words; almost every BPE vocabulary holds each, with
/// its leading space, as a single token, so N words make about N tokens.
const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "name",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "green",
    "blue",
    "red",
];

/// A prompt of about `tokens` tokens: a prefix unique to request `index`
/// (so no server prefix cache can reuse another request's prompt), then
/// random common words.
pub fn synthetic_prompt(index: usize, tokens: usize, rng: &mut impl Rng) -> String {
    let mut s = format!("{index} {:08x}:", rng.random::<u32>());
    // The prefix itself is about four tokens.
    for _ in 0..tokens.saturating_sub(4).max(1) {
        s.push(' ');
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// Reads prompts from JSONL: one `{"prompt": "..."}` or
/// `{"messages": [...]}` object per non-empty line.
pub fn read_prompts(path: &Path) -> Result<Vec<Prompt>, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::Prompts {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let bad = |line: usize, reason: String| BenchError::Prompts {
        path: path.display().to_string(),
        reason: format!("line {line}: {reason}"),
    };
    let mut prompts = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(line).map_err(|e| bad(i + 1, e.to_string()))?;
        let prompt = match (v.get("prompt"), v.get("messages")) {
            (Some(Value::String(p)), _) => Prompt::Text(p.clone()),
            (_, Some(Value::Array(m))) if !m.is_empty() => Prompt::Messages(m.clone()),
            _ => {
                return Err(bad(
                    i + 1,
                    "expected {\"prompt\": string} or {\"messages\": [non-empty array]}".into(),
                ))
            }
        };
        prompts.push(prompt);
    }
    if prompts.is_empty() {
        return Err(BenchError::Prompts {
            path: path.display().to_string(),
            reason: "no prompts in the file".into(),
        });
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn length_specs_parse_and_sample_in_range() {
        assert_eq!("512".parse(), Ok(LengthSpec::Fixed(512)));
        assert_eq!("uniform:4:9".parse(), Ok(LengthSpec::Uniform(4, 9)));
        assert!("0".parse::<LengthSpec>().is_err());
        assert!("uniform:9:4"
            .parse::<LengthSpec>()
            .unwrap_err()
            .contains("above"));
        assert!("uniform:4".parse::<LengthSpec>().is_err());
        assert!("lots".parse::<LengthSpec>().is_err());
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..100 {
            assert!((4..=9).contains(&LengthSpec::Uniform(4, 9).sample(&mut rng)));
        }
    }

    #[test]
    fn synthetic_prompts_have_the_length_and_unique_prefixes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let a = synthetic_prompt(1, 100, &mut rng);
        let b = synthetic_prompt(2, 100, &mut rng);
        assert_eq!(a.split(' ').count(), 1 + 1 + 96);
        assert_ne!(a.split(':').next(), b.split(':').next());
    }

    #[test]
    fn prompt_files_accept_both_shapes_and_name_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"hi\"}\n\n{\"messages\": [{\"role\": \"user\", \"content\": \"yo\"}]}\n",
        )
        .unwrap();
        let p = read_prompts(&path).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0], Prompt::Text("hi".into()));
        std::fs::write(&path, "{\"prompt\": \"hi\"}\n{\"text\": 1}\n").unwrap();
        let err = read_prompts(&path).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }
}
