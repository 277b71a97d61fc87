//! The engine's account of where a step's time goes: the backend's part
//! (here a null backend sleeping as a busy device would) apart from the
//! engine's own host work, which `tandem` reports in `EngineStats` and in its
//! slow-step warnings.

mod engine_support;

use std::time::Duration;

use engine_support::null_backend::NullBackend;
use engine_support::{tiny_config, GQA};
use tandem_api::infer::Infer;
use tandem_api::types::{GenerateEvent, GenerateRequest, SamplingParams, StopParams};
use tandem_engine::{Engine, EngineConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_time_is_counted_apart_from_the_engines_own() {
    let step = Duration::from_millis(3);
    let backend = NullBackend::new(tiny_config(GQA), 42).with_step_time(step);
    let counters = backend.counters();
    let engine = Engine::start(
        Box::new(backend),
        EngineConfig {
            num_blocks: Some(64),
            ..EngineConfig::default()
        },
        vec![2],
        256,
        "test",
    )
    .unwrap();
    let mut stream = engine
        .generate(GenerateRequest {
            id: "timing".into(),
            prompt: (1..=20).collect(),
            sampling: SamplingParams::greedy(),
            stop: StopParams {
                max_tokens: 12,
                stop_token_ids: vec![],
                ignore_eos: true,
            },
        })
        .unwrap();
    let mut tokens = Vec::new();
    while let Some(event) = stream.next_event().await {
        match event {
            GenerateEvent::Token(t) => tokens.push(t.id),
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Error(e) => panic!("{e}"),
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    assert_eq!(tokens, vec![42; 12]);
    // The last step's accounting lands right after its token is sent.
    let mut stats = engine.stats();
    for _ in 0..100 {
        if stats.steps == 12 && stats.running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        stats = engine.stats();
    }
    assert_eq!(stats.steps, 12, "one prefill step, then one per token");
    let backend_steps = counters.steps.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(backend_steps, 12);
    assert!(
        stats.step_backend_nanos >= 12 * step.as_nanos() as u64,
        "{stats:?}"
    );
    assert!(stats.step_host_nanos > 0, "{stats:?}");
    assert!(
        stats.step_host_nanos < stats.step_backend_nanos,
        "the engine's own work is a small part of a step: {stats:?}"
    );
}
