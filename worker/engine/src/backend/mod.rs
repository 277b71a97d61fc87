//! Compute backends: the part of the engine that owns device memory (weights and
//! the paged KV pool) and runs forward steps. The scheduler and block manager
//! above are backend-agnostic; the CPU ([`cpu`]) and CUDA ([`cuda`], with
//! [`cuda::tp`] for tensor parallelism) backends implement the same trait,
//! and [`cuda_harness`] checks and times the CUDA one on a GPU.

pub mod cpu;
pub mod cuda;
pub mod cuda_harness;
pub mod sampling;

use tandem_api::types::{KvExport, KvLayerChunk, KvPieces};
use tandem_model::{ModelConfig, Tensor, Weights};

pub use cpu::{Bf16Activations, CpuBackend, WeightStorage};
pub use cuda::{CudaBackend, CudaOptions, DeviceArgs, DeviceSpec, LoadFormat};
pub use sampling::DeviceSampling;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("KV cache is not initialised: call init_kv_cache first")]
    KvCacheNotInitialised,
    #[error("invalid KV cache geometry: {0}")]
    KvGeometry(String),
    #[error("block id {block} is out of range (the pool has {num_blocks} blocks)")]
    BlockOutOfRange { block: u32, num_blocks: usize },
    #[error(
        "block table of {blocks} blocks cannot hold {tokens} tokens at block size {block_size}"
    )]
    BlockTableTooShort {
        blocks: usize,
        tokens: usize,
        block_size: usize,
    },
    #[error("token id {token} is outside the vocabulary of {vocab} tokens")]
    TokenOutOfRange { token: u32, vocab: usize },
    #[error("KV import does not match this model: {0}")]
    KvShapeMismatch(String),
    #[error("invalid weights: {0}")]
    Weights(String),
    #[error("{sampling} sampling rules for {rows} rows of logits")]
    SamplingRows { sampling: usize, rows: usize },
    #[error(transparent)]
    Cuda(#[from] cuda::CudaError),
    #[error(transparent)]
    TensorParallel(#[from] cuda::tp::TpError),
    /// Writing KV straight into another worker's pool (cuda-ipc) is not
    /// something this backend can do.
    #[error("the {0} backend cannot write KV into another worker's pool (cuda-ipc needs CUDA)")]
    NoPeerKv(&'static str),
}

fn check_shape(name: &str, t: &Tensor, shape: &[usize]) -> Result<(), BackendError> {
    if t.shape != shape {
        return Err(BackendError::Weights(format!(
            "{name} has shape {:?}, the config implies {shape:?}",
            t.shape
        )));
    }
    Ok(())
}

/// Checks every tensor's shape against the config (and that q/k/v biases are
/// all there or all absent, as `attention_bias` says): what every backend
/// needs before it lays weights out its own way.
pub(crate) fn check_weights(cfg: &ModelConfig, w: &Weights) -> Result<(), BackendError> {
    let h = cfg.hidden_size;
    let q_dim = cfg.num_heads * cfg.head_dim;
    let kv_dim = cfg.num_kv_heads * cfg.head_dim;
    let f = cfg.intermediate_size;
    if w.layers.len() != cfg.num_layers {
        return Err(BackendError::Weights(format!(
            "{} layers of weights for a {}-layer config",
            w.layers.len(),
            cfg.num_layers
        )));
    }
    check_shape("embed_tokens", &w.embed_tokens, &[cfg.vocab_size, h])?;
    check_shape("final_norm", &w.final_norm, &[h])?;
    if let Some(head) = &w.lm_head {
        check_shape("lm_head", head, &[cfg.vocab_size, h])?;
    }
    for (i, l) in w.layers.iter().enumerate() {
        let name = |n: &str| format!("layer {i} {n}");
        check_shape(&name("attn_norm"), &l.attn_norm, &[h])?;
        check_shape(&name("wq"), &l.wq, &[q_dim, h])?;
        check_shape(&name("wk"), &l.wk, &[kv_dim, h])?;
        check_shape(&name("wv"), &l.wv, &[kv_dim, h])?;
        check_shape(&name("wo"), &l.wo, &[h, q_dim])?;
        check_shape(&name("ffn_norm"), &l.ffn_norm, &[h])?;
        check_shape(&name("w_gate"), &l.w_gate, &[f, h])?;
        check_shape(&name("w_up"), &l.w_up, &[f, h])?;
        check_shape(&name("w_down"), &l.w_down, &[h, f])?;
        match (&l.bq, &l.bk, &l.bv) {
            (Some(bq), Some(bk), Some(bv)) => {
                check_shape(&name("bq"), bq, &[q_dim])?;
                check_shape(&name("bk"), bk, &[kv_dim])?;
                check_shape(&name("bv"), bv, &[kv_dim])?;
            }
            (None, None, None) => {}
            _ => {
                return Err(BackendError::Weights(format!(
                    "layer {i} has some but not all of the q/k/v biases"
                )))
            }
        }
        if l.bq.is_some() != cfg.attention_bias {
            return Err(BackendError::Weights(format!(
                "layer {i}: attention_bias is {} but biases are {}",
                cfg.attention_bias,
                if l.bq.is_some() { "present" } else { "absent" }
            )));
        }
    }
    Ok(())
}

/// Checks the shapes of a `write_kv_layer` call against the model: an existing
/// layer, as many K as V values, whole tokens. Returns the values per token.
pub(crate) fn check_kv_layer(
    cfg: &ModelConfig,
    layer: usize,
    k: &[f32],
    v: &[f32],
) -> Result<usize, BackendError> {
    let w = cfg.num_kv_heads * cfg.head_dim;
    if layer >= cfg.num_layers || k.len() != v.len() || !k.len().is_multiple_of(w) {
        return Err(BackendError::KvShapeMismatch(format!(
            "layer {layer} with {} K and {} V values; the model has {} layers and {w} values per token",
            k.len(),
            v.len(),
            cfg.num_layers
        )));
    }
    Ok(w)
}

/// Checks the geometry of a KV pool `init_kv_cache` is asked for.
pub(crate) fn check_kv_geometry(block_size: usize, num_blocks: usize) -> Result<(), BackendError> {
    if block_size == 0 || num_blocks == 0 {
        return Err(BackendError::KvGeometry(format!(
            "block_size ({block_size}) and num_blocks ({num_blocks}) must be positive"
        )));
    }
    Ok(())
}

/// Checks that every block id is inside a pool of `num_blocks` blocks.
pub(crate) fn check_blocks_in_pool(blocks: &[u32], num_blocks: usize) -> Result<(), BackendError> {
    match blocks.iter().find(|&&b| b as usize >= num_blocks) {
        Some(&block) => Err(BackendError::BlockOutOfRange { block, num_blocks }),
        None => Ok(()),
    }
}

/// Checks that `token` is inside the model's vocabulary.
pub(crate) fn check_token(cfg: &ModelConfig, token: u32) -> Result<(), BackendError> {
    if token as usize >= cfg.vocab_size {
        return Err(BackendError::TokenOutOfRange {
            token,
            vocab: cfg.vocab_size,
        });
    }
    Ok(())
}

/// Rows of logits a step of `batch` produces: one per sequence wanting
/// logits that computes a token.
pub(crate) fn logit_rows(batch: &[SeqInput<'_>]) -> usize {
    batch
        .iter()
        .filter(|s| s.need_logits && !s.tokens.is_empty())
        .count()
}

/// Checks that there is one sampling rule per sequence wanting logits.
pub(crate) fn check_sampling_rows(
    batch: &[SeqInput<'_>],
    sampling: &[DeviceSampling],
) -> Result<(), BackendError> {
    let rows = logit_rows(batch);
    if rows != sampling.len() {
        return Err(BackendError::SamplingRows {
            sampling: sampling.len(),
            rows,
        });
    }
    Ok(())
}

/// One sequence's share of a forward step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// The tokens to compute this step (a prefill chunk, or the one decode token).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence; positions before it are already
    /// in the KV cache.
    pub start_pos: usize,
    /// Physical blocks covering positions `0 .. start_pos + tokens.len()`.
    pub block_table: &'a [u32],
    /// Whether the caller wants logits of the last token of `tokens`.
    pub need_logits: bool,
}

/// Receives, as soon as a layer has been computed, the K and V that this step
/// wrote for one sequence's new tokens. Lets KV export stream layer by layer
/// while later layers still compute.
pub trait KvLayerSink {
    /// `k` and `v` are `[new_tokens, kv_heads, head_dim]` for sequence
    /// `seq_index` of the batch, positions `start_pos ..`.
    fn layer_computed(&mut self, layer: usize, seq_index: usize, k: &[f32], v: &[f32]);

    /// The same as rows of `[K | V]` (each `kv_dim` values) per new token,
    /// as a backend stages them: lets a sink convert them in one pass
    /// instead of receiving split copies first.
    fn layer_rows_computed(&mut self, layer: usize, seq_index: usize, rows: &[f32], kv_dim: usize) {
        let mut k = Vec::with_capacity(rows.len() / 2);
        let mut v = Vec::with_capacity(rows.len() / 2);
        for row in rows.chunks_exact(2 * kv_dim) {
            k.extend_from_slice(&row[..kv_dim]);
            v.extend_from_slice(&row[kv_dim..]);
        }
        self.layer_computed(layer, seq_index, &k, &v);
    }
}

/// Owns the weights and the paged KV pool of one model and runs forward steps.
///
/// The KV pool holds, per layer, K and V as `[num_blocks * block_size, kv_heads,
/// head_dim]`; slot `b * block_size + i` is position `i` of physical block `b`.
pub trait ComputeBackend: Send {
    /// Short name for logs and metrics (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    fn config(&self) -> &ModelConfig;

    /// Bytes of KV cache one token occupies across all layers.
    fn kv_bytes_per_token(&self) -> usize;

    /// Element type of the KV pool: what a transfer ships without losing
    /// anything (the K and V handed to a [`KvLayerSink`] are its values as f32).
    fn kv_dtype(&self) -> tandem_api::types::KvDtype {
        tandem_api::types::KvDtype::F32
    }

    /// Memory the backend can give the KV pool (a GPU's memory left under
    /// `--gpu-memory-utilization`); `None` leaves the size to the engine's
    /// configured budget.
    fn kv_cache_budget_bytes(&self) -> Option<usize> {
        None
    }

    /// (Re)allocates the KV pool. Contents start zeroed.
    fn init_kv_cache(&mut self, block_size: usize, num_blocks: usize) -> Result<(), BackendError>;

    /// Runs one step over a batch and writes, for every sequence with
    /// `need_logits`, in batch order, a row of `vocab_size` logits into `logits`
    /// (which is resized to `[n_logit_rows, vocab]`).
    fn forward(
        &mut self,
        batch: &[SeqInput<'_>],
        logits: &mut Vec<f32>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError>;

    /// Copies the first `num_tokens` positions held by `block_ids` out of the
    /// pool, in the layout-independent export format.
    fn read_kv(&self, block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError>;

    /// Writes one layer's K and V (`[num_tokens, kv_heads, head_dim]`) for
    /// positions `start_pos ..` into the blocks of `block_ids` (which cover
    /// positions from 0).
    fn write_kv_layer(
        &mut self,
        block_ids: &[u32],
        start_pos: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), BackendError>;

    /// Like [`ComputeBackend::read_kv`], as bytes of the pool's dtype
    /// ([`ComputeBackend::kv_dtype`]), ready for the wire. This default
    /// encodes `read_kv`'s values; a backend may copy its pool's bytes as
    /// they are instead.
    fn read_kv_pieces(
        &self,
        block_ids: &[u32],
        num_tokens: usize,
    ) -> Result<KvPieces, BackendError> {
        let kv = self.read_kv(block_ids, num_tokens)?;
        let dtype = self.kv_dtype();
        Ok(KvPieces {
            dtype,
            num_layers: kv.layers.len(),
            num_tokens,
            kv_heads: kv.kv_heads,
            head_dim: kv.head_dim,
            pieces: kv
                .layers
                .iter()
                .enumerate()
                .map(|(layer, (k, v))| KvLayerChunk {
                    layer,
                    start_pos: 0,
                    num_tokens,
                    k: dtype.encode(k),
                    v: dtype.encode(v),
                })
                .collect(),
        })
    }

    /// Writes one piece of K and V given as bytes of `dtype` (see
    /// [`ComputeBackend::write_kv_layer`] for the positions). This default
    /// widens them to f32 first; a backend whose pool has `dtype` may copy
    /// them as they are.
    fn write_kv_piece(
        &mut self,
        block_ids: &[u32],
        dtype: tandem_api::types::KvDtype,
        piece: &KvLayerChunk,
    ) -> Result<(), BackendError> {
        let widen = |bytes: &[u8]| {
            dtype.decode(bytes).ok_or_else(|| {
                BackendError::KvShapeMismatch(format!(
                    "{} bytes are not whole {dtype:?} values",
                    bytes.len()
                ))
            })
        };
        let (k, v) = (widen(&piece.k)?, widen(&piece.v)?);
        self.write_kv_layer(block_ids, piece.start_pos, piece.layer, &k, &v)
    }

    /// Writes a prompt's KV delivered in pieces (see [`KvPieces`]).
    fn write_kv_pieces(&mut self, block_ids: &[u32], kv: &KvPieces) -> Result<(), BackendError> {
        let cfg = self.config();
        if kv.num_layers != cfg.num_layers
            || kv.kv_heads != cfg.num_kv_heads
            || kv.head_dim != cfg.head_dim
        {
            return Err(BackendError::KvShapeMismatch(format!(
                "KV of {} layers x {} kv heads x head_dim {}, model has {} x {} x {}",
                kv.num_layers,
                kv.kv_heads,
                kv.head_dim,
                cfg.num_layers,
                cfg.num_kv_heads,
                cfg.head_dim
            )));
        }
        for piece in &kv.pieces {
            self.write_kv_piece(block_ids, kv.dtype, piece)?;
        }
        Ok(())
    }

    /// The KV pool as another process on this node can map it (cuda-ipc);
    /// `None` when the backend's pool cannot be shared that way.
    fn kv_pool_export(&self) -> Result<Option<cuda::ipc::KvPoolExport>, BackendError> {
        Ok(None)
    }

    /// Maps a peer's exported pool (once; later calls reuse it) after
    /// checking that this pool's blocks can be copied into it.
    fn open_peer_kv(&mut self, _pool: &cuda::ipc::KvPoolExport) -> Result<(), BackendError> {
        Err(BackendError::NoPeerKv(self.name()))
    }

    /// Copies the first `num_tokens` positions held by `block_ids`, every
    /// layer, into `target`'s blocks of a peer's pool; returns once the copy
    /// has finished.
    fn write_kv_to_peer(
        &mut self,
        _block_ids: &[u32],
        _num_tokens: usize,
        _target: &cuda::ipc::PeerKvTarget,
    ) -> Result<cuda::ipc::PeerWrite, BackendError> {
        Err(BackendError::NoPeerKv(self.name()))
    }

    /// Whether [`ComputeBackend::forward_sampled`] picks the tokens where the
    /// logits are (so they never travel to the host).
    fn samples_on_device(&self) -> bool {
        false
    }

    /// Runs one step like [`ComputeBackend::forward`] and picks the next
    /// token of every sequence with `need_logits`, in batch order, by
    /// [`sampling::sample_row`]'s rule with `sampling[i]` for the i-th of
    /// them. This default samples the step's logits on the host.
    fn forward_sampled(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        check_sampling_rows(batch, sampling)?;
        let mut logits = Vec::new();
        self.forward(batch, &mut logits, sink)?;
        let vocab = self.config().vocab_size;
        Ok(logits
            .chunks(vocab)
            .zip(sampling)
            .map(|(row, s)| sampling::sample_row(row, s))
            .collect())
    }

    /// Like [`ComputeBackend::forward_sampled`], with some rows held to a
    /// grammar. `masks` is called once, when the backend needs the masks
    /// (after it has started the step, so computing them overlaps the
    /// forward), with `sampling.len()` rows of `vocab.div_ceil(32)` words,
    /// every bit set; it clears the bit of each token a row may not pick
    /// (bit `t % 32` of word `t / 32`). This default masks and samples the
    /// step's logits on the host.
    fn forward_sampled_masked(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        masks: &mut dyn FnMut(&mut [u32], usize),
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        check_sampling_rows(batch, sampling)?;
        let mut logits = Vec::new();
        self.forward(batch, &mut logits, sink)?;
        let vocab = self.config().vocab_size;
        let words = vocab.div_ceil(32);
        let mut bits = vec![u32::MAX; sampling.len() * words];
        masks(&mut bits, words);
        Ok(logits
            .chunks_mut(vocab)
            .zip(bits.chunks(words))
            .zip(sampling)
            .map(|((row, allowed), s)| {
                tandem_guide::mask_logits(row, allowed);
                sampling::sample_row(row, s)
            })
            .collect())
    }

    /// CUDA graphs captured so far (0 for a backend without them): the
    /// engine tells a step that captured one, which stalls it, from others.
    fn graphs_captured(&self) -> usize {
        0
    }

    /// Copies every layer's K and V of block `src` into block `dst`.
    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError>;

    /// Writes a whole export (all layers, positions `0 .. kv.num_tokens`).
    fn write_kv(&mut self, block_ids: &[u32], kv: &KvExport) -> Result<(), BackendError> {
        let cfg = self.config();
        if kv.num_layers() != cfg.num_layers
            || kv.kv_heads != cfg.num_kv_heads
            || kv.head_dim != cfg.head_dim
        {
            return Err(BackendError::KvShapeMismatch(format!(
                "export has {} layers x {} kv heads x head_dim {}, model has {} x {} x {}",
                kv.num_layers(),
                kv.kv_heads,
                kv.head_dim,
                cfg.num_layers,
                cfg.num_kv_heads,
                cfg.head_dim
            )));
        }
        for (layer, (k, v)) in kv.layers.iter().enumerate() {
            self.write_kv_layer(block_ids, 0, layer, k, v)?;
        }
        Ok(())
    }
}

/// The weights a backend is created from.
#[derive(Debug, Clone, Copy)]
pub enum WeightsSource<'a> {
    /// Loaded from the model's files.
    Host(&'a Weights),
    /// Random weights of the config's shape (`--load-format dummy`), made on
    /// the device itself where there is one.
    Dummy { seed: u64 },
}

/// Checks what [`create`] needs of the machine before any weight is read (a
/// large model takes minutes to load; a missing driver should not be found
/// after that): on CUDA the libraries, the driver and `tensor_parallel_size`
/// GPUs from `cuda:N` on; on the CPU, no tensor parallelism.
pub fn preflight(device: &DeviceSpec, tensor_parallel_size: usize) -> Result<(), BackendError> {
    let tp = tensor_parallel_size;
    match *device {
        _ if tp == 0 => Err(cuda::tp::TpError::ZeroSize.into()),
        DeviceSpec::Cpu if tp > 1 => Err(cuda::tp::TpError::NotOnCpu(tp).into()),
        DeviceSpec::Cpu => Ok(()),
        DeviceSpec::Cuda(first) => Ok(cuda::check_gpus(first, tp)?),
    }
}

/// Creates the backend `device` names for a model. `cuda_options` sizes the
/// GPU's workspace and KV budget (ignored on the CPU, which stores weights in
/// its compact form) and says over how many GPUs, from `device` on, the model
/// is sharded.
pub fn create(
    device: &DeviceSpec,
    config: ModelConfig,
    weights: WeightsSource<'_>,
    cuda_options: &CudaOptions,
) -> Result<Box<dyn ComputeBackend>, BackendError> {
    let tp = cuda_options.tensor_parallel_size;
    preflight(device, tp)?;
    Ok(match (device, weights) {
        (DeviceSpec::Cuda(first), weights) if tp > 1 => {
            Box::new(cuda::tp::TensorParallelBackend::new(
                *first,
                tp,
                config,
                weights,
                cuda_options.clone(),
            )?)
        }
        (DeviceSpec::Cpu, WeightsSource::Host(w)) => {
            Box::new(CpuBackend::new(config, w, WeightStorage::default())?)
        }
        (DeviceSpec::Cpu, WeightsSource::Dummy { seed }) => {
            let w = tandem_model::testing::random_weights(&config, seed);
            Box::new(CpuBackend::new(config, &w, WeightStorage::default())?)
        }
        (DeviceSpec::Cuda(n), WeightsSource::Host(w)) => {
            Box::new(CudaBackend::new(*n, config, w, cuda_options.clone())?)
        }
        (DeviceSpec::Cuda(n), WeightsSource::Dummy { seed }) => Box::new(CudaBackend::new_dummy(
            *n,
            config,
            seed,
            cuda_options.clone(),
        )?),
    })
}
