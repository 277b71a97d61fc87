//! The engine with a backend that samples where the logits are (as the CUDA
//! backend does): it asks the backend for tokens instead of logits when every
//! sampled request allows it, greedy output is unchanged, seeded requests
//! repeat, and requests wanting logprobs still get them (host sampling).
//! The backend here is the CPU backend with the trait's default
//! `forward_sampled` (the host version of the device rule).

mod engine_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use engine_support::wrapped::{Hooks, Wrapped};
use engine_support::*;
use tandem_api::infer::{GenerateStream, Infer};
use tandem_api::types::{GenerateEvent, GenerateRequest, SamplingParams, StopParams};
use tandem_engine::backend::{
    BackendError, ComputeBackend, CpuBackend, DeviceSampling, KvLayerSink, SeqInput, WeightStorage,
};
use tandem_engine::{Engine, EngineConfig, EngineHandle};

/// Makes the CPU backend claim to sample on the device, counting the steps
/// that asked it for tokens.
struct DeviceSampled {
    sampled_steps: Arc<AtomicUsize>,
}

impl Hooks for DeviceSampled {
    fn name(&self, _inner: &dyn ComputeBackend) -> &'static str {
        "sampling-cpu"
    }
    fn samples_on_device(&self, _inner: &dyn ComputeBackend) -> bool {
        true
    }
    fn forward_sampled(
        &mut self,
        inner: &mut dyn ComputeBackend,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.sampled_steps.fetch_add(1, Ordering::SeqCst);
        // The trait's default: forward, then the host rule per row.
        let mut logits = Vec::new();
        inner.forward(batch, &mut logits, sink)?;
        let vocab = inner.config().vocab_size;
        Ok(logits
            .chunks(vocab)
            .zip(sampling)
            .map(|(row, s)| tandem_engine::backend::sampling::sample_row(row, s))
            .collect())
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        block_size: 16,
        num_blocks: Some(64),
        max_batch_tokens: 32,
        max_num_seqs: 8,
        max_queue: 32,
        threads: 2,
        ..EngineConfig::default()
    }
}

fn engines() -> (EngineHandle, EngineHandle, Arc<AtomicUsize>) {
    let cfg = tiny_config(GQA);
    let w = random_weights(&cfg, 21);
    let plain = CpuBackend::new(cfg.clone(), &w, WeightStorage::F32).unwrap();
    let counted = Arc::new(AtomicUsize::new(0));
    let device = Wrapped {
        inner: CpuBackend::new(cfg.clone(), &w, WeightStorage::F32).unwrap(),
        hooks: DeviceSampled {
            sampled_steps: counted.clone(),
        },
    };
    let start =
        |b: Box<dyn ComputeBackend>| Engine::start(b, config(), vec![0], 256, "test").unwrap();
    (start(Box::new(plain)), start(Box::new(device)), counted)
}

fn request(prompt: Vec<u32>, sampling: SamplingParams) -> GenerateRequest {
    GenerateRequest {
        id: "t".into(),
        prompt,
        sampling,
        stop: StopParams {
            max_tokens: 16,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
    }
}

/// Token ids and whether every token carried a logprob.
async fn collect(mut stream: GenerateStream) -> (Vec<u32>, bool) {
    let (mut ids, mut all_logprobs) = (Vec::new(), true);
    while let Some(ev) = stream.next_event().await {
        match ev {
            GenerateEvent::Token(t) => {
                all_logprobs &= t.logprob.is_some();
                ids.push(t.id);
            }
            GenerateEvent::Finished(_) => return (ids, all_logprobs),
            GenerateEvent::Error(e) => panic!("engine error: {e}"),
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    panic!("stream ended without Finished")
}

#[tokio::test]
async fn greedy_is_unchanged_and_the_backend_samples() {
    let (plain, device, sampled_steps) = engines();
    let prompt: Vec<u32> = (0..11).map(|i| 1 + (i * 37) % 90).collect();
    let want = collect(
        plain
            .generate(request(prompt.clone(), SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    let got = collect(
        device
            .generate(request(prompt, SamplingParams::greedy()))
            .unwrap(),
    )
    .await;
    assert_eq!(got.0, want.0);
    assert!(!got.1, "no logprobs were asked for");
    // Prefill's first token and every decode step came from the backend.
    assert_eq!(sampled_steps.load(Ordering::SeqCst), 16);
}

#[tokio::test]
async fn seeded_requests_repeat_and_logprobs_fall_back_to_host_sampling() {
    let (_, device, sampled_steps) = engines();
    let sampling = SamplingParams {
        temperature: 0.9,
        top_k: Some(20),
        top_p: 0.9,
        seed: Some(77),
        ..SamplingParams::default()
    };
    let prompt: Vec<u32> = (0..9).map(|i| 1 + (i * 13) % 90).collect();
    let first = collect(
        device
            .generate(request(prompt.clone(), sampling.clone()))
            .unwrap(),
    )
    .await;
    let again = collect(
        device
            .generate(request(prompt.clone(), sampling.clone()))
            .unwrap(),
    )
    .await;
    assert_eq!(first.0, again.0);
    let before = sampled_steps.load(Ordering::SeqCst);
    assert_eq!(before, 32);
    let with_logprobs = SamplingParams {
        logprobs: Some(2),
        ..sampling
    };
    let host = collect(device.generate(request(prompt, with_logprobs)).unwrap()).await;
    assert!(host.1, "every token reports its logprob");
    assert_eq!(
        sampled_steps.load(Ordering::SeqCst),
        before,
        "host sampling for logprobs"
    );
}
