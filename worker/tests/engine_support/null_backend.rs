//! A backend that computes nothing: every step answers at once with a fixed
//! token per sampled sequence, as a GPU backend that samples on the device
//! would. What an engine driven over it spends per step is the engine's own
//! host time (scheduling, block bookkeeping, streaming), nothing else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_api::types::{KvDtype, KvExport};
use tandem_engine::backend::{BackendError, ComputeBackend, DeviceSampling, KvLayerSink, SeqInput};
use tandem_model::ModelConfig;

/// What the engine handed the backend, for tests that check the batches.
#[derive(Debug, Default)]
pub struct NullCounters {
    pub steps: AtomicU64,
    pub tokens: AtomicU64,
    /// Sum over steps of the sequences in the batch.
    pub sequences: AtomicU64,
}

pub struct NullBackend {
    cfg: ModelConfig,
    token: u32,
    /// Each step sleeps this long (a device busy computing), so a benchmark
    /// can watch steps go by; zero answers at once.
    step_time: Duration,
    counters: Arc<NullCounters>,
}

impl NullBackend {
    /// Answers `token` for every sampled sequence.
    pub fn new(cfg: ModelConfig, token: u32) -> Self {
        Self {
            cfg,
            token,
            step_time: Duration::ZERO,
            counters: Arc::default(),
        }
    }

    /// Makes every step take `step_time` (sleeping), as a device would.
    pub fn with_step_time(mut self, step_time: Duration) -> Self {
        self.step_time = step_time;
        self
    }

    pub fn counters(&self) -> Arc<NullCounters> {
        self.counters.clone()
    }

    fn count(&self, batch: &[SeqInput<'_>]) -> usize {
        if !self.step_time.is_zero() {
            std::thread::sleep(self.step_time);
        }
        let c = &self.counters;
        c.steps.fetch_add(1, Ordering::Relaxed);
        c.sequences.fetch_add(batch.len() as u64, Ordering::Relaxed);
        c.tokens.fetch_add(
            batch.iter().map(|s| s.tokens.len() as u64).sum(),
            Ordering::Relaxed,
        );
        batch
            .iter()
            .filter(|s| s.need_logits && !s.tokens.is_empty())
            .count()
    }
}

impl ComputeBackend for NullBackend {
    fn name(&self) -> &'static str {
        "null"
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_layers * self.cfg.num_kv_heads * self.cfg.head_dim * 2
    }

    fn kv_dtype(&self) -> KvDtype {
        KvDtype::Bf16
    }

    fn init_kv_cache(
        &mut self,
        _block_size: usize,
        _num_blocks: usize,
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn forward(
        &mut self,
        batch: &[SeqInput<'_>],
        logits: &mut Vec<f32>,
        _sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        let rows = self.count(batch);
        let vocab = self.cfg.vocab_size;
        logits.clear();
        logits.resize(rows * vocab, 0.0);
        for row in logits.chunks_mut(vocab) {
            row[self.token as usize] = 1.0;
        }
        Ok(())
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn forward_sampled(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        _sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        let rows = self.count(batch);
        assert_eq!(rows, sampling.len(), "one sampling rule per sampled row");
        Ok(vec![self.token; rows])
    }

    fn read_kv(&self, _block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError> {
        let width = self.cfg.num_kv_heads * self.cfg.head_dim;
        Ok(KvExport {
            dtype: KvDtype::F32,
            num_tokens,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            layers: (0..self.cfg.num_layers)
                .map(|_| (vec![0.0; num_tokens * width], vec![0.0; num_tokens * width]))
                .collect(),
        })
    }

    fn write_kv_layer(
        &mut self,
        _block_ids: &[u32],
        _start_pos: usize,
        _layer: usize,
        _k: &[f32],
        _v: &[f32],
    ) -> Result<(), BackendError> {
        Ok(())
    }

    fn copy_block(&mut self, _src: u32, _dst: u32) -> Result<(), BackendError> {
        Ok(())
    }
}
