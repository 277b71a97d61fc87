//! The engine's sampling rules on the real default model (SmolLM2-135M-Instruct):
//! grammars hold while other requests share the batch, a prefill-only run
//! samples its first token under the grammar (what a prefill worker does for
//! a decode worker), a decode side refuses a first token outside it, and
//! prompt logprobs line up with the logprobs of generated tokens. A backend
//! that samples where the logits are (as CUDA does) gets the grammar's masks
//! and picks the same tokens as the host sampler.

mod engine_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use engine_support::wrapped::{Hooks, Wrapped};
use tandem_engine::backend::{BackendError, ComputeBackend, DeviceSampling, KvLayerSink, SeqInput};

use tandem_api::infer::{GenerateStream, Infer};
use tandem_api::types::{
    GenerateEvent, GenerateRequest, Grammar, SamplingParams, StopParams, TokenOutput,
};
use tandem_engine::backend::cpu::{CpuBackend, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_guide::Guide;
use tandem_model::{load, resolve, ChatMessage, LoadedModel};

fn default_model() -> LoadedModel {
    let path = resolve(None).expect("the default model is in the cache (make model)");
    load(&path).expect("the default model loads")
}

fn start(model: &LoadedModel, guide: bool) -> EngineHandle {
    let backend = CpuBackend::new(
        model.config.clone(),
        &model.weights,
        WeightStorage::default(),
    )
    .unwrap();
    let e = Engine::start(
        Box::new(backend),
        EngineConfig::default(),
        model.tokenizer.eos_token_ids().to_vec(),
        model.config.max_position_embeddings,
        "test",
    )
    .unwrap();
    if guide {
        e.with_guide(Guide::new(model.tokenizer.clone()))
    } else {
        e
    }
}

/// The CPU backend claiming to sample on the device, with the trait's host
/// version of masked device sampling; counts the masked steps and the rows
/// whose mask forbade something.
struct DeviceMasked {
    masked_steps: Arc<AtomicUsize>,
    masked_rows: Arc<AtomicUsize>,
}

impl Hooks for DeviceMasked {
    fn samples_on_device(&self, _inner: &dyn ComputeBackend) -> bool {
        true
    }

    fn forward_sampled_masked(
        &mut self,
        inner: &mut dyn ComputeBackend,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        masks: &mut dyn FnMut(&mut [u32], usize),
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.masked_steps.fetch_add(1, Ordering::SeqCst);
        let rows = &self.masked_rows;
        let mut counted = |bits: &mut [u32], words: usize| {
            masks(bits, words);
            let restricted = bits
                .chunks(words)
                .filter(|r| r.iter().any(|&w| w != u32::MAX));
            rows.fetch_add(restricted.count(), Ordering::SeqCst);
        };
        inner.forward_sampled_masked(batch, sampling, &mut counted, sink)
    }
}

fn start_device_masked(model: &LoadedModel) -> (EngineHandle, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let (steps, rows) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let backend = Wrapped {
        inner: CpuBackend::new(
            model.config.clone(),
            &model.weights,
            WeightStorage::default(),
        )
        .unwrap(),
        hooks: DeviceMasked {
            masked_steps: steps.clone(),
            masked_rows: rows.clone(),
        },
    };
    let e = Engine::start(
        Box::new(backend),
        EngineConfig::default(),
        model.tokenizer.eos_token_ids().to_vec(),
        model.config.max_position_embeddings,
        "test",
    )
    .unwrap()
    .with_guide(Guide::new(model.tokenizer.clone()));
    (e, steps, rows)
}

fn chat_prompt(model: &LoadedModel, question: &str) -> Vec<u32> {
    let text = model
        .chat_template
        .as_ref()
        .unwrap()
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    model.tokenizer.encode(&text).unwrap()
}

fn request(prompt: Vec<u32>, sampling: SamplingParams, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: "constrained".into(),
        prompt,
        sampling,
        stop: StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: false,
        },
    }
}

struct Outcome {
    tokens: Vec<TokenOutput>,
    prompt_logprobs: Option<Vec<TokenOutput>>,
    error: Option<String>,
}

async fn collect(mut stream: GenerateStream) -> Outcome {
    let mut out = Outcome {
        tokens: vec![],
        prompt_logprobs: None,
        error: None,
    };
    while let Some(ev) = stream.next_event().await {
        match ev {
            GenerateEvent::Token(t) => out.tokens.push(t),
            GenerateEvent::PromptLogprobs(p) => {
                assert!(out.prompt_logprobs.is_none(), "sent once");
                assert!(out.tokens.is_empty(), "before the first token");
                out.prompt_logprobs = Some(p);
            }
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Error(e) => {
                out.error = Some(e);
                break;
            }
            GenerateEvent::Started { .. } => {}
        }
    }
    out
}

fn text(model: &LoadedModel, tokens: &[TokenOutput]) -> String {
    let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
    model.tokenizer.decode(&ids, true)
}

#[tokio::test]
async fn json_schemas_hold_for_every_request_of_a_shared_batch() {
    let model = default_model();
    let e = start(&model, true);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"enum": ["France", "Italy", "Spain"]},
            "population_millions": {"type": "number"},
            "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3}
        },
        "required": ["city", "country", "population_millions", "landmarks"],
        "additionalProperties": false
    });
    let questions = [
        "Describe Paris as JSON.",
        "Give me facts about Rome in JSON.",
        "Madrid, as a JSON object please.",
    ];
    let mut streams = Vec::new();
    for q in questions {
        let sampling = SamplingParams {
            grammar: Some(Grammar::JsonSchema(schema.to_string())),
            ..SamplingParams::greedy()
        };
        streams.push(
            e.generate(request(chat_prompt(&model, q), sampling, 160))
                .unwrap(),
        );
    }
    // An unconstrained request in the same batch stays unconstrained.
    let free = e
        .generate(request(
            chat_prompt(&model, "What is the capital of France?"),
            SamplingParams::greedy(),
            24,
        ))
        .unwrap();
    let free = collect(free).await;
    assert!(text(&model, &free.tokens).contains("Paris"));
    for stream in streams {
        let out = collect(stream).await;
        assert_eq!(out.error, None);
        let text = text(&model, &out.tokens);
        let doc: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        let obj = doc.as_object().expect("an object");
        assert_eq!(obj.len(), 4, "{text}");
        assert!(["France", "Italy", "Spain"].contains(&doc["country"].as_str().unwrap()));
        assert!(doc["population_millions"].is_number(), "{text}");
        assert!(doc["landmarks"].as_array().unwrap().len() <= 3, "{text}");
    }
}

#[tokio::test]
async fn a_prefill_only_run_samples_its_first_token_under_the_grammar() {
    let model = default_model();
    let e = start(&model, true);
    let prompt = chat_prompt(&model, "What is the capital of France?");
    let unconstrained = e
        .prefill_only(prompt.clone(), SamplingParams::greedy())
        .await
        .unwrap();
    let first = model
        .tokenizer
        .decode(&[unconstrained.first_token.id], true);
    assert!(
        !first.trim_start().starts_with(char::is_numeric),
        "{first:?}"
    );
    let digits = SamplingParams {
        grammar: Some(Grammar::Regex("[0-9]{1,4}".into())),
        ..SamplingParams::greedy()
    };
    let out = e
        .prefill_only(prompt.clone(), digits.clone())
        .await
        .unwrap();
    let first = model.tokenizer.decode(&[out.first_token.id], true);
    assert!(
        !first.is_empty() && first.chars().all(|c| c.is_ascii_digit()),
        "{first:?}"
    );
    // The decode side continues under the same grammar from that token.
    let stream = e
        .generate_with_kv(
            request(prompt.clone(), digits.clone(), 10),
            out.kv,
            out.first_token,
        )
        .unwrap();
    let cont = collect(stream).await;
    assert_eq!(cont.error, None);
    let all = text(&model, &cont.tokens);
    assert!(
        (1..=4).contains(&all.len()) && all.chars().all(|c| c.is_ascii_digit()),
        "{all:?}"
    );
    // A first token the grammar forbids (a peer that ignored it) fails the
    // request, not the worker.
    let stream = e
        .generate_with_kv(
            request(prompt.clone(), digits, 10),
            unconstrained.kv,
            unconstrained.first_token,
        )
        .unwrap();
    let bad = collect(stream).await;
    assert!(bad.error.unwrap().contains("grammar"));
    assert!(e.is_ready());
}

#[tokio::test]
async fn grammar_errors_are_the_clients_and_need_a_guide() {
    let model = default_model();
    let with = start(&model, true);
    let prompt = chat_prompt(&model, "Hi");
    let bad = SamplingParams {
        grammar: Some(Grammar::JsonSchema("{\"type\": ".into())),
        ..SamplingParams::greedy()
    };
    let err = with
        .generate(request(prompt.clone(), bad, 4))
        .err()
        .unwrap();
    assert!(err.to_string().contains("json_schema"), "{err}");
    let without = start(&model, false);
    let ok = SamplingParams {
        grammar: Some(Grammar::JsonObject),
        ..SamplingParams::greedy()
    };
    assert!(without.generate(request(prompt, ok, 4)).is_err());
}

#[tokio::test]
async fn prompt_logprobs_line_up_with_generated_logprobs() {
    let model = default_model();
    let e = start(&model, true);
    let prompt = chat_prompt(&model, "Name a color.");
    // Greedy first token of the prompt, with its logprob.
    let sampling = SamplingParams {
        logprobs: Some(2),
        ..SamplingParams::greedy()
    };
    let first = collect(e.generate(request(prompt.clone(), sampling, 1)).unwrap()).await;
    let first = &first.tokens[0];
    // The same token appended to the prompt: its prompt logprob is the same number.
    let mut longer = prompt.clone();
    longer.push(first.id);
    let sampling = SamplingParams {
        prompt_logprobs: Some(2),
        ..SamplingParams::greedy()
    };
    let out = collect(e.generate(request(longer.clone(), sampling, 1)).unwrap()).await;
    let plp = out.prompt_logprobs.expect("prompt logprobs");
    assert_eq!(plp.len(), longer.len() - 1);
    let ids: Vec<u32> = plp.iter().map(|t| t.id).collect();
    assert_eq!(ids, longer[1..]);
    let last = plp.last().unwrap();
    let (a, b) = (last.logprob.unwrap(), first.logprob.unwrap());
    assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    assert_eq!(last.top_logprobs.len(), 2);
    assert_eq!(
        last.top_logprobs[0].0, first.id,
        "greedy is the top alternative"
    );
    assert!(plp.iter().all(|t| t.logprob.unwrap() <= 0.0));
}

#[tokio::test]
async fn a_device_sampler_gets_the_masks_and_picks_what_the_host_does() {
    let model = default_model();
    let host = start(&model, true);
    let (device, steps, rows) = start_device_masked(&model);
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "mood": {"enum": ["happy", "sad", "calm"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 120}
        },
        "required": ["name", "mood", "age"],
        "additionalProperties": false
    });
    let prompt = chat_prompt(&model, "Describe a person as JSON.");
    let grammar = Some(Grammar::JsonSchema(schema.to_string()));
    // Greedy: the same tokens as the host sampler, which masks on its own.
    let greedy = SamplingParams {
        grammar: grammar.clone(),
        ..SamplingParams::greedy()
    };
    let want = collect(
        host.generate(request(prompt.clone(), greedy.clone(), 80))
            .unwrap(),
    )
    .await;
    let got = collect(
        device
            .generate(request(prompt.clone(), greedy, 80))
            .unwrap(),
    )
    .await;
    assert_eq!((&got.error, &want.error), (&None, &None));
    let ids = |o: &Outcome| o.tokens.iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(ids(&got), ids(&want), "{}", text(&model, &got.tokens));
    assert!(
        steps.load(Ordering::SeqCst) >= got.tokens.len(),
        "every token under the mask"
    );
    assert!(rows.load(Ordering::SeqCst) >= got.tokens.len());
    // Sampled at a high temperature, every answer still fits the schema.
    for seed in 0..4 {
        let hot = SamplingParams {
            grammar: grammar.clone(),
            temperature: 1.3,
            seed: Some(seed),
            ..SamplingParams::greedy()
        };
        let out = collect(device.generate(request(prompt.clone(), hot, 80)).unwrap()).await;
        assert_eq!(out.error, None);
        let text = text(&model, &out.tokens);
        let doc: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text}"));
        assert!(
            ["happy", "sad", "calm"].contains(&doc["mood"].as_str().unwrap()),
            "{text}"
        );
        assert!(doc["age"].as_u64().is_some_and(|a| a <= 120), "{text}");
    }
}
