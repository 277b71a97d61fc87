//! The engine on the real default model (SmolLM2-135M-Instruct, GGUF Q4_1):
//! it answers a factual question, its compact storage is lossless for this
//! file, and its logits match the naive reference. Needs the model in the
//! cache (`make model`).

mod engine_support;

use std::time::Instant;

use engine_support::{reference_logits, relative_error};
use tandem_api::infer::Infer;
use tandem_api::types::{GenerateEvent, GenerateRequest, SamplingParams, StopParams};
use tandem_engine::backend::cpu::dequantized_weights;
use tandem_engine::backend::{ComputeBackend, CpuBackend, SeqInput, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::{load, resolve, ChatMessage, LoadedModel};

fn default_model() -> LoadedModel {
    let path = resolve(None).expect("the default model is in the cache (make model)");
    load(&path).expect("the default model loads")
}

fn start(model: &LoadedModel, threads: usize) -> EngineHandle {
    let backend = CpuBackend::new(
        model.config.clone(),
        &model.weights,
        WeightStorage::default(),
    )
    .unwrap();
    Engine::start(
        Box::new(backend),
        EngineConfig {
            threads,
            ..EngineConfig::default()
        },
        model.tokenizer.eos_token_ids().to_vec(),
        model.config.max_position_embeddings,
        "test",
    )
    .unwrap()
}

fn chat_prompt(model: &LoadedModel, question: &str) -> Vec<u32> {
    let text = model
        .chat_template
        .as_ref()
        .expect("the default model has a chat template")
        .render(&[ChatMessage::new("user", question)], true)
        .unwrap();
    model.tokenizer.encode(&text).unwrap()
}

fn request(prompt: Vec<u32>, max_tokens: usize, ignore_eos: bool) -> GenerateRequest {
    GenerateRequest {
        id: "default-model".into(),
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos,
        },
    }
}

/// (seconds to first token, seconds from first to last token, tokens).
async fn run(e: &EngineHandle, req: GenerateRequest) -> (f64, f64, Vec<u32>) {
    let start = Instant::now();
    let mut stream = e.generate(req).unwrap();
    let mut first = None;
    let mut tokens = Vec::new();
    while let Some(ev) = stream.next_event().await {
        match ev {
            GenerateEvent::Token(t) => {
                first.get_or_insert_with(Instant::now);
                tokens.push(t.id);
            }
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Error(e) => panic!("{e}"),
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    let first = first.expect("at least one token");
    (
        (first - start).as_secs_f64(),
        first.elapsed().as_secs_f64(),
        tokens,
    )
}

#[tokio::test]
async fn answers_the_capital_of_france() {
    let model = default_model();
    let e = start(&model, 0);
    let prompt = chat_prompt(&model, "What is the capital of France?");
    let (_, _, tokens) = run(&e, request(prompt, 32, false)).await;
    let answer = model.tokenizer.decode(&tokens, true);
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

#[test]
fn compact_storage_is_lossless_and_logits_match_the_reference() {
    let model = default_model();
    let storage = WeightStorage::default();
    let mut backend = CpuBackend::new(model.config.clone(), &model.weights, storage).unwrap();
    // Every layer matrix is Q4_1 in the file and fits the Q4 grid exactly;
    // the embedding (Q8_0 in the file) is kept as Q8.
    assert_eq!(backend.storage_summary(), "q4 x 120, q8 x 1");
    let reference_weights = dequantized_weights(&model.weights, storage);
    let layer = &model.weights.layers[7];
    assert!(relative_error(&reference_weights.layers[7].w_gate.data, &layer.w_gate.data) < 1e-6);
    assert!(
        relative_error(
            &reference_weights.embed_tokens.data,
            &model.weights.embed_tokens.data
        ) < 1e-6,
        "Q8 of a Q8_0 embedding is exact"
    );

    let prompt = chat_prompt(&model, "Hi");
    let prompt = &prompt[..prompt.len().min(5)];
    backend.init_kv_cache(16, 4).unwrap();
    let mut logits = Vec::new();
    backend
        .forward(
            &[SeqInput {
                tokens: prompt,
                start_pos: 0,
                block_table: &[0],
                need_logits: true,
            }],
            &mut logits,
            None,
        )
        .unwrap();
    let want = reference_logits(&model.config, &reference_weights, prompt);
    let err = relative_error(&logits, want.last().unwrap());
    assert!(err < 1e-4, "relative error {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "benchmark; run explicitly in release"]
async fn default_model_throughput() {
    let model = default_model();
    let threads = std::env::var("TANDEM_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let e = start(&model, threads);
    let prompt_500: Vec<u32> = model
        .tokenizer
        .encode(&"The quick brown fox jumps over the lazy dog. ".repeat(60))
        .unwrap()[..500]
        .to_vec();
    run(&e, request(prompt_500[..16].to_vec(), 4, true)).await; // warm-up
    let (ttft, _, _) = run(&e, request(prompt_500.clone(), 1, true)).await;
    println!("prefill 500 tokens: {ttft:.3}s = {:.0} tok/s", 500.0 / ttft);
    let q = chat_prompt(&model, "Write a story about a dragon.");
    let (_, decode, tokens) = run(&e, request(q.clone(), 129, true)).await;
    println!(
        "decode batch 1: {} tokens in {decode:.3}s = {:.1} tok/s",
        tokens.len() - 1,
        (tokens.len() - 1) as f64 / decode
    );
    let start = Instant::now();
    let results =
        futures::future::join_all((0..8).map(|_| run(&e, request(q.clone(), 128, true)))).await;
    let total: usize = results.iter().map(|r| r.2.len()).sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "8 streams: {total} tokens in {secs:.3}s = {:.1} tok/s aggregate",
        total as f64 / secs
    );
}
