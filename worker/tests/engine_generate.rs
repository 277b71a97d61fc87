//! The engine end to end on random tiny models: greedy output equals the naive
//! reference, and batching, chunked prefill, prefix caching, preemption and KV
//! export/import never change the tokens.

mod engine_support;

use std::time::{Duration, Instant};

use engine_support::wrapped::{Hooks, Wrapped};
use engine_support::*;
use tandem_api::infer::{GenerateStream, Infer, InferError};
use tandem_api::metrics::metrics;
use tandem_api::types::{
    FinishReason, GenerateEvent, GenerateRequest, KvDtype, SamplingParams, StopParams,
};
use tandem_engine::backend::{CpuBackend, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::{ModelConfig, Weights};

const MAX_MODEL_LEN: usize = 256;

fn model() -> (ModelConfig, Weights) {
    let cfg = tiny_config(GQA);
    let weights = random_weights(&cfg, 21);
    (cfg, weights)
}

fn engine(cfg: &ModelConfig, weights: &Weights, ecfg: EngineConfig) -> EngineHandle {
    let backend = CpuBackend::new(cfg.clone(), weights, WeightStorage::F32).unwrap();
    Engine::start(Box::new(backend), ecfg, vec![0], MAX_MODEL_LEN, "test").unwrap()
}

fn config(block_size: usize, num_blocks: usize) -> EngineConfig {
    EngineConfig {
        block_size,
        num_blocks: Some(num_blocks),
        max_batch_tokens: 32,
        max_num_seqs: 16,
        max_queue: 64,
        threads: 2,
        ..EngineConfig::default()
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 31 + seed * 17 + i * i * seed) % 95)
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        id: "t".into(),
        prompt,
        sampling,
        stop: StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
    }
}

struct Outcome {
    tokens: Vec<u32>,
    cached_tokens: usize,
    finish: FinishReason,
}

async fn collect(mut stream: GenerateStream) -> Outcome {
    let mut out = Outcome {
        tokens: vec![],
        cached_tokens: usize::MAX,
        finish: FinishReason::Cancelled,
    };
    while let Some(ev) = stream.next_event().await {
        match ev {
            GenerateEvent::Started { cached_tokens, .. } => out.cached_tokens = cached_tokens,
            GenerateEvent::Token(t) => out.tokens.push(t.id),
            GenerateEvent::PromptLogprobs(_) => {}
            GenerateEvent::Finished(r) => {
                out.finish = r;
                return out;
            }
            GenerateEvent::Error(e) => panic!("engine error: {e}"),
        }
    }
    panic!("stream ended without Finished")
}

async fn greedy(e: &EngineHandle, prompt: Vec<u32>, n: usize) -> Vec<u32> {
    let out = collect(
        e.generate(request(prompt, n, SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    assert_eq!(out.finish, FinishReason::Length);
    out.tokens
}

fn reference_greedy(cfg: &ModelConfig, w: &Weights, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut seq = prompt.to_vec();
    for _ in 0..n {
        let logits = reference_logits(cfg, w, &seq);
        seq.push(argmax(logits.last().unwrap()));
    }
    seq[prompt.len()..].to_vec()
}

async fn wait_until(
    e: &EngineHandle,
    what: &str,
    cond: impl Fn(&tandem_engine::EngineStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = e.stats();
        if cond(&s) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn greedy_generation_matches_the_reference_forward() {
    let (cfg, w) = model();
    // A budget of 8 tokens per step forces the 30-token prompt through chunks.
    let e = engine(
        &cfg,
        &w,
        EngineConfig {
            max_batch_tokens: 8,
            ..config(4, 64)
        },
    );
    let p = prompt(3, 30);
    let decoded_before = metrics().decode_tokens.with_label_values(&["test"]).get();
    assert_eq!(
        greedy(&e, p.clone(), 12).await,
        reference_greedy(&cfg, &w, &p, 12)
    );
    assert!(e.stats().prefill_tokens >= 30);
    assert_eq!(e.stats().decode_tokens, 12);
    // The worker metrics move too (other tests share the role label, hence >=).
    let decoded = metrics().decode_tokens.with_label_values(&["test"]).get() - decoded_before;
    assert!(decoded >= 12, "decode_tokens_total moved by {decoded}");
}

#[tokio::test]
async fn eight_concurrent_requests_equal_each_alone() {
    let (cfg, w) = model();
    let prompts: Vec<Vec<u32>> = (0..8).map(|i| prompt(i + 1, 5 + 7 * i as usize)).collect();
    let alone_engine = engine(&cfg, &w, config(16, 64));
    let mut alone = Vec::new();
    for p in &prompts {
        alone.push(greedy(&alone_engine, p.clone(), 16).await);
    }
    let e = engine(&cfg, &w, config(16, 64));
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            e.generate(request(p.clone(), 16, SamplingParams::greedy()))
                .unwrap()
        })
        .collect();
    let together = futures::future::join_all(streams.into_iter().map(collect)).await;
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, &t.tokens, "request {i} changed when batched");
    }
    assert_eq!(alone[2], reference_greedy(&cfg, &w, &prompts[2], 16));
}

#[tokio::test]
async fn seeded_sampling_is_reproducible_in_any_batch() {
    let (cfg, w) = model();
    let sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(1234),
        ..SamplingParams::default()
    };
    let e = engine(&cfg, &w, config(16, 64));
    let p = prompt(5, 9);
    let alone = collect(
        e.generate(request(p.clone(), 20, sampling.clone()))
            .unwrap(),
    )
    .await;
    let others: Vec<_> = (0..4)
        .map(|i| {
            e.generate(request(prompt(i + 10, 12), 20, SamplingParams::default()))
                .unwrap()
        })
        .collect();
    let again = collect(e.generate(request(p, 20, sampling)).unwrap()).await;
    futures::future::join_all(others.into_iter().map(collect)).await;
    assert_eq!(alone.tokens, again.tokens);
}

#[tokio::test]
async fn prefix_cache_hits_give_the_same_tokens_as_misses() {
    let (cfg, w) = model();
    let e = engine(&cfg, &w, config(4, 64));
    let p = prompt(7, 22);
    let miss = collect(
        e.generate(request(p.clone(), 10, SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    assert_eq!(miss.cached_tokens, 0);
    let hit = collect(
        e.generate(request(p.clone(), 10, SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    assert_eq!(hit.cached_tokens, 20, "five full blocks of four reused");
    assert_eq!(hit.tokens, miss.tokens);
    // A prompt sharing only a prefix reuses that much and matches a cold engine.
    let mut q = p[..9].to_vec();
    q.extend(prompt(8, 6));
    let partial = collect(
        e.generate(request(q.clone(), 10, SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    assert_eq!(partial.cached_tokens, 8);
    let cold = engine(&cfg, &w, config(4, 64));
    assert_eq!(partial.tokens, greedy(&cold, q, 10).await);
    assert!(e.stats().prefix_cache_hit_tokens >= 28);
}

#[tokio::test]
async fn preemption_under_a_tiny_pool_keeps_the_tokens() {
    let (cfg, w) = model();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| prompt(i + 20, 9 + i as usize)).collect();
    let roomy = engine(&cfg, &w, config(4, 128));
    let mut want = Vec::new();
    for p in &prompts {
        want.push(greedy(&roomy, p.clone(), 24).await);
    }
    // 12 blocks of 4 = 48 slots for four sequences of ~35 tokens each.
    let tight = engine(&cfg, &w, config(4, 12));
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            tight
                .generate(request(p.clone(), 24, SamplingParams::greedy()))
                .unwrap()
        })
        .collect();
    let got = futures::future::join_all(streams.into_iter().map(collect)).await;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(w, &g.tokens, "request {i} changed by preemption");
    }
    assert!(tight.stats().preemptions > 0, "{:?}", tight.stats());
    wait_until(&tight, "blocks freed", |s| s.kv_blocks_used == 0).await;
}

#[tokio::test]
async fn dropping_the_stream_cancels_and_frees_blocks() {
    let (cfg, w) = model();
    let e = engine(&cfg, &w, config(4, 64));
    let mut stream = e
        .generate(request(prompt(1, 20), 200, SamplingParams::greedy()))
        .unwrap();
    let mut tokens = 0;
    while tokens < 3 {
        if let Some(GenerateEvent::Token(_)) = stream.next_event().await {
            tokens += 1;
        }
    }
    assert!(e.stats().kv_blocks_used > 0);
    drop(stream);
    wait_until(&e, "cancellation", |s| {
        s.kv_blocks_used == 0 && s.running == 0
    })
    .await;
    assert!(e.stats().decode_tokens < 200, "generation stopped early");
}

#[tokio::test]
async fn a_full_queue_refuses_with_overloaded_and_recovers() {
    let (cfg, w) = model();
    let e = engine(
        &cfg,
        &w,
        EngineConfig {
            max_num_seqs: 1,
            max_queue: 2,
            ..config(16, 64)
        },
    );
    let mut first = e
        .generate(request(prompt(1, 4), 250, SamplingParams::greedy()))
        .unwrap();
    // Once it runs, it holds the only running slot for 250 tokens.
    assert!(matches!(
        first.next_event().await,
        Some(GenerateEvent::Started { .. })
    ));
    let queued: Vec<_> = (0..2)
        .map(|i| {
            e.generate(request(prompt(i, 4), 4, SamplingParams::greedy()))
                .unwrap()
        })
        .collect();
    match e.generate(request(prompt(9, 4), 4, SamplingParams::greedy())) {
        Err(InferError::Overloaded(msg)) => assert!(msg.contains("2 requests"), "{msg}"),
        Err(other) => panic!("expected Overloaded, got {other}"),
        Ok(_) => panic!("expected Overloaded, the request was admitted"),
    }
    drop(first);
    for q in queued {
        assert_eq!(collect(q).await.tokens.len(), 4);
    }
    assert_eq!(greedy(&e, prompt(9, 4), 4).await.len(), 4);
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_reason() {
    let (cfg, w) = model();
    let e = engine(&cfg, &w, config(4, 8));
    let refuse = |p: Vec<u32>, max_tokens: usize| match e.generate(request(
        p,
        max_tokens,
        SamplingParams::greedy(),
    )) {
        Err(InferError::Invalid(m)) => m,
        Err(other) => panic!("expected Invalid, got {other}"),
        Ok(_) => panic!("expected Invalid, the request was admitted"),
    };
    assert!(refuse(vec![], 4).contains("empty"));
    assert!(refuse(vec![1, 96], 4).contains("token id 96"));
    assert!(refuse(vec![1; MAX_MODEL_LEN], 4).contains("context"));
    assert!(refuse(vec![1; 40], 4).contains("KV blocks"));
    assert!(refuse(vec![1; 4], 0).contains("max_tokens"));
}

#[tokio::test]
async fn generation_stops_at_max_model_len() {
    let (cfg, w) = model();
    let e = engine(&cfg, &w, config(16, 64));
    let out = collect(
        e.generate(request(
            prompt(2, MAX_MODEL_LEN - 3),
            50,
            SamplingParams::greedy(),
        ))
        .unwrap(),
    )
    .await;
    assert_eq!(out.tokens.len(), 3);
    assert_eq!(out.finish, FinishReason::Length);
}

#[tokio::test]
async fn exported_kv_continues_on_another_engine_with_another_block_size() {
    let (cfg, w) = model();
    let prefill = engine(&cfg, &w, config(4, 64));
    let decode = engine(&cfg, &w, config(16, 16));
    for (i, len) in [5usize, 16, 29].into_iter().enumerate() {
        let p = prompt(i as u32 + 40, len);
        let in_place = greedy(&prefill, p.clone(), 12).await;
        // The second prefill of the prompt hits the prefix cache; the export
        // must still cover every position.
        let out = prefill
            .prefill_only(p.clone(), SamplingParams::greedy())
            .await
            .unwrap();
        assert_eq!(out.kv.num_tokens, len);
        assert_eq!(out.first_token.id, in_place[0]);
        let continued = collect(
            decode
                .generate_with_kv(
                    request(p, 12, SamplingParams::greedy()),
                    out.kv,
                    out.first_token,
                )
                .unwrap(),
        )
        .await;
        assert_eq!(continued.tokens, in_place, "prompt of {len} tokens");
    }
    wait_until(&prefill, "prefill blocks freed", |s| s.kv_blocks_used == 0).await;
    wait_until(&decode, "decode blocks freed", |s| s.kv_blocks_used == 0).await;
}

#[tokio::test]
async fn mismatched_kv_import_is_refused() {
    let (cfg, w) = model();
    let e = engine(&cfg, &w, config(4, 64));
    let out = e
        .prefill_only(prompt(1, 6), SamplingParams::greedy())
        .await
        .unwrap();
    let err = e
        .generate_with_kv(
            request(prompt(1, 7), 4, SamplingParams::greedy()),
            out.kv.clone(),
            out.first_token.clone(),
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("covers 6 tokens"), "{err}");
    let mut truncated = out.kv;
    truncated.layers.pop();
    let err = e
        .generate_with_kv(
            request(prompt(1, 6), 4, SamplingParams::greedy()),
            truncated,
            out.first_token,
        )
        .err()
        .unwrap();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[tokio::test]
async fn prefill_streams_every_layer_of_every_position_once_per_chunk() {
    use tandem_api::types::PrefillEvent;
    let (cfg, w) = model();
    // Chunks of 8 tokens: a 21-token prompt takes three steps.
    let e = engine(
        &cfg,
        &w,
        EngineConfig {
            max_batch_tokens: 8,
            ..config(4, 64)
        },
    );
    let p = prompt(12, 21);
    let whole = e
        .prefill_only(p.clone(), SamplingParams::greedy())
        .await
        .unwrap();
    let cold = engine(
        &cfg,
        &w,
        EngineConfig {
            max_batch_tokens: 8,
            ..config(4, 64)
        },
    );
    let mut stream = cold
        .prefill_stream(p.clone(), SamplingParams::greedy())
        .unwrap();
    let mut seen = vec![vec![0usize; p.len()]; cfg.num_layers];
    let mut order = Vec::new();
    let first = loop {
        match stream.next_event().await.unwrap() {
            PrefillEvent::Started {
                prompt_tokens,
                cached_tokens,
            } => {
                assert_eq!((prompt_tokens, cached_tokens), (21, 0));
            }
            PrefillEvent::Kv(c) => {
                let width = cfg.num_kv_heads * cfg.head_dim;
                // The CPU pool's f32 values, as little-endian bytes.
                assert_eq!(c.k.len(), c.num_tokens * width * 4);
                let (ck, cv) = (
                    KvDtype::F32.decode(&c.k).unwrap(),
                    KvDtype::F32.decode(&c.v).unwrap(),
                );
                let (k, v) = &whole.kv.layers[c.layer];
                let range = c.start_pos * width..(c.start_pos + c.num_tokens) * width;
                assert_eq!(&k[range.clone()], &ck[..], "layer {} K", c.layer);
                assert_eq!(&v[range], &cv[..], "layer {} V", c.layer);
                for n in &mut seen[c.layer][c.start_pos..c.start_pos + c.num_tokens] {
                    *n += 1;
                }
                order.push((c.start_pos, c.layer));
            }
            PrefillEvent::Done(t) => break t,
            PrefillEvent::Error(e) => panic!("{e}"),
            PrefillEvent::PeerWritten(_) => panic!("no peer was asked to receive the KV"),
        }
    };
    assert_eq!(first, whole.first_token);
    assert!(seen.iter().flatten().all(|&n| n == 1), "{seen:?}");
    // Layer by layer within each chunk of 8 positions.
    let expected: Vec<(usize, usize)> = [0, 8, 16]
        .into_iter()
        .flat_map(|start| (0..cfg.num_layers).map(move |l| (start, l)))
        .collect();
    assert_eq!(order, expected);
    // A prefix-cache hit sends the cached positions first, then the rest.
    let again = e.prefill_only(p, SamplingParams::greedy()).await.unwrap();
    assert_eq!(again.cached_tokens, 20);
    assert_eq!(again.kv, whole.kv);
}

/// Hooks that change nothing but report when the backend they wrap has been
/// dropped.
struct ReportDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for ReportDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Hooks for ReportDrop {}

/// `shutdown` returns once the engine thread has ended and dropped its
/// backend (a GPU backend's state must be gone before the process exits),
/// and reports a clone still holding the engine open.
#[tokio::test]
async fn shutdown_waits_until_the_backend_is_dropped() {
    let (cfg, weights) = model();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let backend = Wrapped {
        inner: CpuBackend::new(cfg.clone(), &weights, WeightStorage::F32).unwrap(),
        hooks: ReportDrop(dropped.clone()),
    };
    let handle = Engine::start(
        Box::new(backend),
        config(4, 32),
        vec![0],
        MAX_MODEL_LEN,
        "test",
    )
    .unwrap();
    let out = collect(
        handle
            .generate(request(prompt(1, 9), 4, SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    assert_eq!(out.tokens.len(), 4);
    let clone = handle.clone();
    assert!(
        !handle.shutdown(Duration::from_millis(200)),
        "a live clone keeps the engine running"
    );
    assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
    assert!(clone.shutdown(Duration::from_secs(10)));
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the backend is dropped by the time shutdown returns"
    );
}
