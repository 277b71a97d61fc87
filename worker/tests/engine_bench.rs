//! Throughput of the engine on a random model shaped like the default model
//! (SmolLM2-135M). Not a test: run it explicitly, optimised, e.g.
//! `cargo test -p tandem --release --test engine_bench -- --ignored --nocapture`.

mod engine_support;

use std::time::Instant;

use engine_support::{q4_rounded, random_weights};
use tandem_api::infer::Infer;
use tandem_api::types::{GenerateEvent, GenerateRequest, SamplingParams, StopParams};
use tandem_engine::backend::{CpuBackend, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::Weights;
use tandem_model::{Architecture, ModelConfig};

fn smollm2_135m_shape() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: 49152,
        hidden_size: 576,
        intermediate_size: 1536,
        num_layers: 30,
        num_heads: 9,
        num_kv_heads: 3,
        head_dim: 64,
        rope_theta: 100000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        max_position_embeddings: 8192,
        tie_word_embeddings: true,
        attention_bias: false,
    }
}

/// Random weights with the default model's value structure: layer matrices on
/// a Q4_1 grid (as dequantized from its GGUF), the embedding unconstrained
/// (Q8_0 in the GGUF; stored as Q8 here either way).
fn default_model_like_weights(cfg: &ModelConfig) -> Weights {
    let raw = random_weights(cfg, 1);
    let mut w = q4_rounded(&raw);
    w.embed_tokens = raw.embed_tokens;
    w
}

/// `TANDEM_BENCH_STORAGE`: f32, q8, or compact (the default).
fn storage_from_env() -> WeightStorage {
    match std::env::var("TANDEM_BENCH_STORAGE").as_deref() {
        Ok("f32") => WeightStorage::F32,
        Ok("q8") => WeightStorage::Q8,
        _ => WeightStorage::Compact,
    }
}

fn request(prompt_len: usize, max_tokens: usize, seed: u32) -> GenerateRequest {
    GenerateRequest {
        id: "bench".into(),
        prompt: (0..prompt_len as u32)
            .map(|i| (i * 7919 + seed * 104729) % 49152)
            .collect(),
        sampling: SamplingParams::greedy(),
        stop: StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
    }
}

/// Returns (seconds to the first token, seconds from first to last token, tokens).
async fn run(e: &EngineHandle, req: GenerateRequest) -> (f64, f64, usize) {
    let start = Instant::now();
    let mut stream = e.generate(req).unwrap();
    let mut first = None;
    let mut n = 0;
    while let Some(ev) = stream.next_event().await {
        match ev {
            GenerateEvent::Token(_) => {
                n += 1;
                first.get_or_insert_with(Instant::now);
            }
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Error(e) => panic!("{e}"),
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    let first = first.unwrap();
    (
        (first - start).as_secs_f64(),
        first.elapsed().as_secs_f64(),
        n,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "benchmark; run explicitly in release"]
async fn smollm2_shaped_throughput() {
    let cfg = smollm2_135m_shape();
    let t = Instant::now();
    let weights = default_model_like_weights(&cfg);
    let storage = storage_from_env();
    let backend = CpuBackend::new(cfg.clone(), &weights, storage).unwrap();
    println!(
        "weights: {storage:?} ({}), {:.1} MiB, kernel {}, built in {:.1}s",
        backend.storage_summary(),
        backend.weight_bytes() as f64 / (1 << 20) as f64,
        backend.kernel_name(),
        t.elapsed().as_secs_f64()
    );
    drop(weights);
    let threads = std::env::var("TANDEM_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let e = Engine::start(
        Box::new(backend),
        EngineConfig {
            threads,
            ..EngineConfig::default()
        },
        vec![],
        8192,
        "bench",
    )
    .unwrap();

    run(&e, request(16, 4, 99)).await; // warm-up
    let (ttft, _, _) = run(&e, request(500, 1, 1)).await;
    println!(
        "prefill 500 tokens: {:.3}s = {:.0} tok/s",
        ttft,
        500.0 / ttft
    );
    let (_, decode, n) = run(&e, request(32, 65, 2)).await;
    println!(
        "decode batch 1: {} tokens in {:.3}s = {:.1} tok/s",
        n - 1,
        decode,
        (n - 1) as f64 / decode
    );
    let start = Instant::now();
    let results = futures::future::join_all((0..8).map(|i| run(&e, request(32, 64, 10 + i)))).await;
    let total: usize = results.iter().map(|r| r.2).sum();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "8 streams: {total} tokens in {secs:.3}s = {:.1} tok/s aggregate",
        total as f64 / secs
    );
}

/// CPU seconds this process has used (user + system), from /proc: unlike wall
/// time it is not inflated by other processes competing for the cores.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based) of the whole line.
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[test]
#[ignore = "benchmark; run explicitly in release"]
fn smollm2_shaped_forward_cost_per_core() {
    use tandem_engine::backend::{ComputeBackend, SeqInput};
    let cfg = smollm2_135m_shape();
    let weights = default_model_like_weights(&cfg);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut backend = CpuBackend::new(cfg.clone(), &weights, storage_from_env()).unwrap();
    drop(weights);
    backend.init_kv_cache(16, 64).unwrap();
    println!(
        "kernel {}, storage {}",
        backend.kernel_name(),
        backend.storage_summary()
    );
    let table: Vec<u32> = (0..64).collect();
    let tokens: Vec<u32> = (0..512).map(|i| (i * 7919) % 49152).collect();
    let mut logits = Vec::new();
    pool.install(|| {
        for t in [1usize, 4, 8, 64, 256] {
            let reps = (256 / t).clamp(4, 64);
            let (wall, cpu) = (Instant::now(), process_cpu_seconds());
            for _ in 0..reps {
                backend
                    .forward(
                        &[SeqInput {
                            tokens: &tokens[..t],
                            start_pos: 0,
                            block_table: &table,
                            need_logits: true,
                        }],
                        &mut logits,
                        None,
                    )
                    .unwrap();
            }
            let cpu = process_cpu_seconds() - cpu;
            println!(
                "{t:>3} tokens/step, 1 thread: {:.1} tok/s per CPU second ({:.1} tok/s wall)",
                (reps * t) as f64 / cpu,
                (reps * t) as f64 / wall.elapsed().as_secs_f64()
            );
        }
    });
}
