//! The engine's host time per decode step, with nothing computed: an engine
//! over [`NullBackend`] (answers every step with a fixed token, as a GPU
//! backend sampling on the device does, after sleeping 1 ms as a device
//! busy computing) runs N sequences at a long context, each streamed to its
//! own consumer task that turns events into the decode service's gRPC
//! messages, as `Decode.Generate` does. The engine times each step and
//! subtracts the backend's part: what remains is scheduling, block
//! bookkeeping and streaming, the time a GPU would sit idle between steps.
//! Not a test; run it optimised:
//!
//! ```text
//! cargo test --release -p tandem --test engine_host_bench -- --ignored --nocapture
//! ```
//!
//! `TANDEM_BENCH_SEQS` (default `32,64,128`) and `TANDEM_BENCH_CONTEXT`
//! (default 3000) choose the grid, `TANDEM_BENCH_STEPS` (500) the decode
//! steps measured. With `TANDEM_BENCH_DEVICE=cuda:0` the
//! same runs on a GPU with dummy llama3-8b weights instead of the null
//! backend (no sleep): then "backend" is the CUDA step as the engine sees it
//! (its host-side preparation, the kernels, the wait for the token ids).

mod engine_support;

use std::time::{Duration, Instant};

use engine_support::null_backend::NullBackend;
use tandem_api::infer::Infer;
use tandem_api::types::{GenerateEvent, GenerateRequest, SamplingParams, StopParams};
use tandem_disagg::roles::event_to_pb;
use tandem_engine::backend::{self, ComputeBackend, CudaOptions, DeviceSpec, WeightsSource};
use tandem_engine::{Engine, EngineConfig, EngineHandle};

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|v| v.trim().parse().expect("a list of numbers"))
        .collect()
}

fn request(seq: usize, context: usize, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: format!("host-bench-{seq}"),
        // Distinct prompts: no prefix sharing between sequences.
        prompt: (0..context as u32)
            .map(|i| (i * 7919 + seq as u32 * 104_729) % 128_000)
            .collect(),
        sampling: SamplingParams::greedy(),
        stop: StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
    }
}

/// Consumes one request's events as the decode service does (each event into
/// its gRPC message); returns the tokens received.
async fn consume(engine: EngineHandle, req: GenerateRequest) -> usize {
    let mut stream = engine.generate(req).expect("admitted");
    let mut tokens = 0;
    while let Some(event) = stream.next_event().await {
        let message = event_to_pb(&event);
        std::hint::black_box(&message);
        match event {
            GenerateEvent::Token(_) => tokens += 1,
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Error(e) => panic!("{e}"),
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    tokens
}

/// What the null backend's steps take (a device computing).
const STEP_TIME: Duration = Duration::from_millis(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; run explicitly in release"]
async fn engine_host_time_per_decode_step() {
    // Slow-step warnings on stderr (RUST_LOG, default warn).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
    let cfg = tandem_model::dummy::config("llama3-8b").unwrap();
    let context = env_list("TANDEM_BENCH_CONTEXT", "3000")[0];
    // Decode steps measured; the sequences run longer, so the window
    // closes while all of them still run.
    let decode_steps = env_list("TANDEM_BENCH_STEPS", "500")[0];
    let on = std::env::var("TANDEM_BENCH_DEVICE").unwrap_or_else(|_| "null backend".into());
    println!(
        "engine host time per step, {on}, llama3-8b shape, {context}-token prompts, \
         {decode_steps} decode steps measured"
    );
    println!(
        "{:>6} {:>8} {:>14} {:>16} {:>16}",
        "seqs", "steps", "wall us/step", "backend us/step", "host us/step"
    );
    for seqs in env_list("TANDEM_BENCH_SEQS", "32,64,128") {
        let max_tokens = 2 * decode_steps;
        let max_model_len = (context + max_tokens + 16).next_multiple_of(16);
        let blocks_per_seq = (context + max_tokens).div_ceil(16) + 1;
        let device: Box<dyn ComputeBackend> = match std::env::var("TANDEM_BENCH_DEVICE") {
            Ok(d) => backend::create(
                &d.parse::<DeviceSpec>().unwrap(),
                cfg.clone(),
                WeightsSource::Dummy { seed: 0 },
                &CudaOptions {
                    max_batch_tokens: 8192,
                    max_num_seqs: 256,
                    max_model_len,
                    gpu_memory_utilization: 0.9,
                    cuda_graphs: true,
                    tensor_parallel_size: 1,
                },
            )
            .unwrap(),
            Err(_) => Box::new(NullBackend::new(cfg.clone(), 42).with_step_time(STEP_TIME)),
        };
        let engine = Engine::start(
            device,
            EngineConfig {
                block_size: 16,
                num_blocks: Some(seqs * blocks_per_seq),
                max_batch_tokens: 8192,
                max_num_seqs: 256,
                max_queue: 1024,
                ..EngineConfig::default()
            },
            vec![2],
            max_model_len,
            "bench",
        )
        .unwrap();
        let consumers: Vec<_> = (0..seqs)
            .map(|i| tokio::spawn(consume(engine.clone(), request(i, context, max_tokens))))
            .collect();
        // Measure once every prompt is in: steps of decodes only.
        let waiting = Instant::now();
        while engine.stats().decode_tokens < (seqs * 10) as u64 {
            assert!(
                waiting.elapsed() < Duration::from_secs(120),
                "the prompts never all ran: {:?}",
                engine.stats()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (stats0, t0) = (engine.stats(), Instant::now());
        let (stats1, wall) = loop {
            let (now, wall) = (engine.stats(), t0.elapsed());
            if now.steps >= stats0.steps + decode_steps as u64 {
                break (now, wall);
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        assert_eq!(stats1.running, seqs, "the window closed while all ran");
        let steps = stats1.steps - stats0.steps;
        let host = stats1.step_host_nanos - stats0.step_host_nanos;
        let backend_time = stats1.step_backend_nanos - stats0.step_backend_nanos;
        println!(
            "{seqs:>6} {steps:>8} {:>14.1} {:>16.1} {:>16.1}",
            wall.as_secs_f64() * 1e6 / steps as f64,
            backend_time as f64 / 1e3 / steps as f64,
            host as f64 / 1e3 / steps as f64,
        );
        for c in consumers {
            c.abort();
        }
    }
}
