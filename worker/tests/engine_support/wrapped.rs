//! A backend that is another backend with some answers changed: every
//! [`ComputeBackend`] method of [`Wrapped`] goes to the inner backend unless
//! its [`Hooks`] answer instead. Tests that need the CPU backend with a twist
//! (claiming to sample on the device, reporting its drop) write only the
//! twist.

use tandem_api::types::{KvDtype, KvExport, KvLayerChunk, KvPieces};
use tandem_engine::backend::cuda::ipc::{KvPoolExport, PeerKvTarget, PeerWrite};
use tandem_engine::backend::{BackendError, ComputeBackend, DeviceSampling, KvLayerSink, SeqInput};
use tandem_model::ModelConfig;

/// What a [`Wrapped`] backend answers differently from its inner one. Each
/// hook gets the inner backend; the defaults ask it.
pub trait Hooks: Send {
    fn name(&self, inner: &dyn ComputeBackend) -> &'static str {
        inner.name()
    }

    fn samples_on_device(&self, inner: &dyn ComputeBackend) -> bool {
        inner.samples_on_device()
    }

    fn forward_sampled(
        &mut self,
        inner: &mut dyn ComputeBackend,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        inner.forward_sampled(batch, sampling, sink)
    }

    fn forward_sampled_masked(
        &mut self,
        inner: &mut dyn ComputeBackend,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        masks: &mut dyn FnMut(&mut [u32], usize),
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        inner.forward_sampled_masked(batch, sampling, masks, sink)
    }
}

/// `inner` with `hooks`. Fields drop in order: the inner backend first, then
/// the hooks (a hook that reports its drop reports a backend already gone).
pub struct Wrapped<B, H> {
    pub inner: B,
    pub hooks: H,
}

impl<B: ComputeBackend, H: Hooks> ComputeBackend for Wrapped<B, H> {
    fn name(&self) -> &'static str {
        self.hooks.name(&self.inner)
    }

    fn config(&self) -> &ModelConfig {
        self.inner.config()
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.inner.kv_bytes_per_token()
    }

    fn kv_dtype(&self) -> KvDtype {
        self.inner.kv_dtype()
    }

    fn kv_cache_budget_bytes(&self) -> Option<usize> {
        self.inner.kv_cache_budget_bytes()
    }

    fn init_kv_cache(&mut self, block_size: usize, num_blocks: usize) -> Result<(), BackendError> {
        self.inner.init_kv_cache(block_size, num_blocks)
    }

    fn forward(
        &mut self,
        batch: &[SeqInput<'_>],
        logits: &mut Vec<f32>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        self.inner.forward(batch, logits, sink)
    }

    fn read_kv(&self, block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError> {
        self.inner.read_kv(block_ids, num_tokens)
    }

    fn write_kv_layer(
        &mut self,
        block_ids: &[u32],
        start_pos: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), BackendError> {
        self.inner.write_kv_layer(block_ids, start_pos, layer, k, v)
    }

    fn read_kv_pieces(
        &self,
        block_ids: &[u32],
        num_tokens: usize,
    ) -> Result<KvPieces, BackendError> {
        self.inner.read_kv_pieces(block_ids, num_tokens)
    }

    fn write_kv_piece(
        &mut self,
        block_ids: &[u32],
        dtype: KvDtype,
        piece: &KvLayerChunk,
    ) -> Result<(), BackendError> {
        self.inner.write_kv_piece(block_ids, dtype, piece)
    }

    fn write_kv_pieces(&mut self, block_ids: &[u32], kv: &KvPieces) -> Result<(), BackendError> {
        self.inner.write_kv_pieces(block_ids, kv)
    }

    fn kv_pool_export(&self) -> Result<Option<KvPoolExport>, BackendError> {
        self.inner.kv_pool_export()
    }

    fn open_peer_kv(&mut self, pool: &KvPoolExport) -> Result<(), BackendError> {
        self.inner.open_peer_kv(pool)
    }

    fn write_kv_to_peer(
        &mut self,
        block_ids: &[u32],
        num_tokens: usize,
        target: &PeerKvTarget,
    ) -> Result<PeerWrite, BackendError> {
        self.inner.write_kv_to_peer(block_ids, num_tokens, target)
    }

    fn samples_on_device(&self) -> bool {
        self.hooks.samples_on_device(&self.inner)
    }

    fn forward_sampled(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.hooks
            .forward_sampled(&mut self.inner, batch, sampling, sink)
    }

    fn forward_sampled_masked(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        masks: &mut dyn FnMut(&mut [u32], usize),
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.hooks
            .forward_sampled_masked(&mut self.inner, batch, sampling, masks, sink)
    }

    fn graphs_captured(&self) -> usize {
        self.inner.graphs_captured()
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        self.inner.copy_block(src, dst)
    }

    fn write_kv(&mut self, block_ids: &[u32], kv: &KvExport) -> Result<(), BackendError> {
        self.inner.write_kv(block_ids, kv)
    }
}
