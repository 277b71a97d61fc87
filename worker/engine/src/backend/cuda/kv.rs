//! The paged KV pool on the device and the ways KV enters and leaves it
//! besides the forward pass: export (gathered as the pool's bf16), import
//! (scattered, from bf16 or f32), block copies, and cuda-ipc writes into a
//! peer's pool.

use std::borrow::Cow;

use super::device::{
    alloc, alloc_array, alloc_pinned, bf16, kv_box_rows, kv_tensor_map, Dev, DeviceBuffer,
    PinnedBuffer, TmaMap,
};
use super::ipc;
use super::launch::{KvGather, KvScatter, PrefillKernel};
use super::plan::{max_tiles, InputLayout};
use super::CudaBackend;
use crate::backend::{check_blocks_in_pool, check_kv_geometry, BackendError};
use tandem_api::types::{KvDtype, KvLayerChunk, KvPieces};
use tandem_model::ModelConfig;

pub(super) struct KvPool {
    pub block_size: usize,
    pub num_blocks: usize,
    /// K and V of every layer: `[layer][k|v][num_blocks * block_size, kv_dim]`.
    pub data: DeviceBuffer<bf16>,
    /// `data` as one TMA tensor map of `2 * layers * num_blocks * block_size`
    /// rows, for the wgmma prefill kernel (when it runs).
    pub tma: Option<TmaMap>,
    pub layout: InputLayout,
    /// The step inputs on the device ([`InputLayout`]).
    pub inputs: DeviceBuffer<i32>,
    /// Their pinned staging on the host.
    pub host_inputs: PinnedBuffer,
}

impl KvPool {
    /// Layer `layer`'s K and V caches.
    pub fn layer_cache(&self, cfg: &ModelConfig, layer: usize) -> (Dev<bf16>, Dev<bf16>) {
        let per = self.num_blocks * self.block_size * cfg.num_kv_heads * cfg.head_dim;
        let base = self.data.dev().offset(2 * layer * per);
        (base, base.offset(per))
    }
}

/// KV bytes of `dtype` as the pool's bf16: as they are, or f32 rounded.
fn as_bf16(dtype: KvDtype, bytes: &[u8]) -> Result<Cow<'_, [u8]>, BackendError> {
    match dtype {
        KvDtype::Bf16 => Ok(Cow::Borrowed(bytes)),
        KvDtype::F32 => {
            let values = KvDtype::F32
                .decode(bytes)
                .ok_or_else(|| BackendError::KvShapeMismatch("partial f32 values".into()))?;
            Ok(Cow::Owned(KvDtype::Bf16.encode(&values).to_vec()))
        }
    }
}

impl CudaBackend {
    pub(super) fn pool(&self) -> Result<&KvPool, BackendError> {
        self.kv.as_ref().ok_or(BackendError::KvCacheNotInitialised)
    }

    /// (Re)allocates the pool: `num_blocks` blocks of `block_size`
    /// positions, zeroed, with its TMA map when the wgmma prefill kernel can
    /// read it, and the step inputs' buffers sized for it.
    pub(super) fn alloc_kv_pool(
        &mut self,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<(), BackendError> {
        check_kv_geometry(block_size, num_blocks)?;
        self.gpu.bind()?;
        self.gpu.synchronize()?;
        // Graphs point into the old pool.
        self.graphs.clear();
        self.kv = None;
        let bytes = self.cfg.kv_bytes_per_token(2) * block_size * num_blocks;
        let data = alloc(bytes)?.cast();
        self.gpu.zero(&data)?;
        let slots = block_size * num_blocks;
        let rows = 2 * self.cfg.num_layers * slots;
        let row_elems = self.cfg.num_kv_heads * self.cfg.head_dim;
        let tuning = &self.gpu.tuning;
        // The kernel addresses rows with i32 coordinates.
        let tma = match kv_box_rows(block_size, tuning.wg_k) {
            Some(box_rows)
                if self.prefill_preferred == PrefillKernel::Wgmma && rows < 0x7fff_0000 =>
            {
                Some(kv_tensor_map(data.ptr(), rows, row_elems, box_rows)?)
            }
            _ => None,
        };
        self.prefill = match (self.prefill_preferred, &tma) {
            (PrefillKernel::Wgmma, None) => PrefillKernel::TensorCore,
            (kernel, _) => kernel,
        };
        tracing::debug!(prefill = ?self.prefill, block_size, "prefill attention kernel for the KV pool");
        let layout = InputLayout {
            max_tokens: self.opts.max_batch_tokens,
            max_seqs: self.opts.max_num_seqs,
            max_tiles: max_tiles(&self.opts, tuning),
            max_blocks: self.opts.max_model_len.div_ceil(block_size),
            sampling_words: tuning.sampling_words,
        };
        let inputs = alloc_array(layout.len())?;
        let host_inputs = alloc_pinned(layout.len() * 4)?;
        self.gpu.synchronize()?;
        self.kv = Some(KvPool {
            block_size,
            num_blocks,
            data,
            tma,
            layout,
            inputs,
            host_inputs,
        });
        Ok(())
    }

    /// Uploads a block table for the KV import/export kernels.
    fn table_for(
        &self,
        block_ids: &[u32],
        num_positions: usize,
    ) -> Result<DeviceBuffer<i32>, BackendError> {
        let pool = self.pool()?;
        let needed = num_positions.div_ceil(pool.block_size);
        if block_ids.len() < needed {
            return Err(BackendError::BlockTableTooShort {
                blocks: block_ids.len(),
                tokens: num_positions,
                block_size: pool.block_size,
            });
        }
        check_blocks_in_pool(&block_ids[..needed], pool.num_blocks)?;
        Ok(self.gpu.upload(&block_ids[..needed])?.cast())
    }

    /// The first `num_tokens` positions of `block_ids`, every layer, as the
    /// pool's bf16 bytes: gathered on the device, copied once to the host,
    /// no conversion on either side.
    pub(super) fn export_kv(
        &self,
        block_ids: &[u32],
        num_tokens: usize,
    ) -> Result<KvPieces, BackendError> {
        self.gpu.bind()?;
        let pool = self.pool()?;
        let kv_dim = self.cfg.num_kv_heads * self.cfg.head_dim;
        let layer_bytes = num_tokens * kv_dim * 2;
        let mut pieces = Vec::with_capacity(self.cfg.num_layers);
        if num_tokens > 0 {
            let table = self.table_for(block_ids, num_tokens)?;
            let k_out = alloc_array::<bf16>(num_tokens * kv_dim)?;
            let v_out = alloc_array::<bf16>(num_tokens * kv_dim)?;
            for layer in 0..self.cfg.num_layers {
                let (k_cache, v_cache) = pool.layer_cache(&self.cfg, layer);
                self.gpu.kv_gather(&KvGather {
                    k_out: k_out.dev(),
                    v_out: v_out.dev(),
                    k_cache,
                    v_cache,
                    table: table.dev(),
                    tokens: num_tokens,
                    kv_dim,
                    block_size: pool.block_size,
                })?;
                let mut k = vec![0u8; layer_bytes];
                let mut v = vec![0u8; layer_bytes];
                self.gpu.copy_from(Dev::at(k_out.ptr()), &mut k)?;
                self.gpu.copy_from(Dev::at(v_out.ptr()), &mut v)?;
                self.gpu.synchronize()?;
                pieces.push(KvLayerChunk {
                    layer,
                    start_pos: 0,
                    num_tokens,
                    k: k.into(),
                    v: v.into(),
                });
            }
        } else {
            pieces.extend((0..self.cfg.num_layers).map(|layer| KvLayerChunk {
                layer,
                start_pos: 0,
                num_tokens: 0,
                k: Default::default(),
                v: Default::default(),
            }));
        }
        Ok(KvPieces {
            dtype: KvDtype::Bf16,
            num_layers: self.cfg.num_layers,
            num_tokens,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            pieces,
        })
    }

    /// Writes pieces of KV (bf16 as they are, f32 rounded) into the blocks
    /// of `block_ids`.
    pub(super) fn import_kv(
        &mut self,
        block_ids: &[u32],
        kv: &KvPieces,
    ) -> Result<(), BackendError> {
        let kv_dim = self.cfg.num_kv_heads * self.cfg.head_dim;
        if kv.num_layers != self.cfg.num_layers
            || kv.kv_heads * kv.head_dim != kv_dim
            || kv.pieces.iter().any(|p| {
                p.layer >= self.cfg.num_layers
                    || p.k.len() != p.num_tokens * kv_dim * kv.dtype.size()
                    || p.v.len() != p.k.len()
            })
        {
            return Err(BackendError::KvShapeMismatch(format!(
                "KV of {} layers x {} kv heads x head_dim {} (or a piece not of whole positions); \
                 the model has {} x {} x {}",
                kv.num_layers,
                kv.kv_heads,
                kv.head_dim,
                self.cfg.num_layers,
                self.cfg.num_kv_heads,
                self.cfg.head_dim
            )));
        }
        let most = kv.pieces.iter().map(|p| p.num_tokens).max().unwrap_or(0);
        let end = kv
            .pieces
            .iter()
            .map(|p| p.start_pos + p.num_tokens)
            .max()
            .unwrap_or(0);
        if most == 0 {
            return Ok(());
        }
        self.gpu.bind()?;
        // One block table and one device staging for every piece.
        let table = self.table_for(block_ids, end)?;
        let k_in = alloc_array::<bf16>(most * kv_dim)?;
        let v_in = alloc_array::<bf16>(most * kv_dim)?;
        let pool = self.pool()?;
        for p in kv.pieces.iter().filter(|p| p.num_tokens > 0) {
            let (k_cache, v_cache) = pool.layer_cache(&self.cfg, p.layer);
            let (k, v) = (as_bf16(kv.dtype, &p.k)?, as_bf16(kv.dtype, &p.v)?);
            self.gpu.copy_to(&k_in, 0, &k[..])?;
            self.gpu.copy_to(&v_in, 0, &v[..])?;
            self.gpu.kv_scatter(&KvScatter {
                k_cache,
                v_cache,
                k_in: k_in.dev(),
                v_in: v_in.dev(),
                table: table.dev(),
                start_pos: p.start_pos,
                tokens: p.num_tokens,
                kv_dim,
                block_size: pool.block_size,
            })?;
            // The host bytes must outlive the copies and the staging is
            // reused by the next piece: wait for this one.
            self.gpu.synchronize()?;
        }
        Ok(())
    }

    /// Copies every layer's K and V of block `src` into block `dst`.
    pub(super) fn copy_kv_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        self.gpu.bind()?;
        let pool = self.pool()?;
        check_blocks_in_pool(&[src, dst], pool.num_blocks)?;
        let block = pool.block_size * self.cfg.num_kv_heads * self.cfg.head_dim;
        for layer in 0..self.cfg.num_layers {
            let (k_cache, v_cache) = pool.layer_cache(&self.cfg, layer);
            for base in [k_cache, v_cache] {
                self.gpu.copy_device(
                    base.offset(dst as usize * block).addr(),
                    base.offset(src as usize * block).addr(),
                    block * 2,
                )?;
            }
        }
        Ok(())
    }

    /// The KV pool's geometry as the cuda-ipc transport describes it.
    pub(super) fn ipc_layout(&self, pool: &KvPool) -> ipc::KvPoolLayout {
        let block_bytes = pool.block_size * self.cfg.num_kv_heads * self.cfg.head_dim * 2;
        ipc::KvPoolLayout {
            dtype: ipc::PoolDtype::Bf16,
            block_size: pool.block_size,
            num_blocks: pool.num_blocks,
            num_layers: self.cfg.num_layers,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            block_bytes,
            plane_stride_bytes: pool.num_blocks * block_bytes,
        }
    }

    /// Makes the writer of prompts' KV into peers' pools, on first use.
    pub(super) fn init_peer_writer(&mut self) -> Result<(), BackendError> {
        if self.peer_writer.is_none() {
            self.peer_writer = Some(ipc::PeerWriter::new(&self.gpu)?);
        }
        Ok(())
    }
}
