//! The CUDA backend: the engine's forward steps on an NVIDIA GPU.
//!
//! Weights and the paged KV cache are bf16 on the device; arithmetic is f32
//! (cuBLAS GEMMs with f32 accumulation, f32 kernels), and the residual stream
//! stays f32. Kernels are CUDA C (`worker/kernels/llama.cu`) compiled by NVRTC
//! at start for the device's architecture. The residual adds are fused into
//! the output and down projections (GEMMs with `beta = 1` into the f32
//! residual), RoPE into the KV-cache write, the last-token gather into the
//! final RMSNorm. Decode attention is flash-decoding over the paged cache
//! (GQA-aware, split over the context); prefill attention is causal,
//! flash-style, over the paged cache, so chunked prefill and prefix-cache hits
//! need no special path.
//!
//! Steps of 1, 2 or 4 tokens (batch-1..4 decode) skip cuBLAS: four fused
//! matrix-vector kernels a layer (RMSNorm + QKV + bias + RoPE + KV write,
//! output projection + residual, RMSNorm + gate/up + SiLU, down projection +
//! residual) and one for the final norm and output head. The output head's
//! rows are sampled on the device for the whole batch in one kernel
//! ([`super::sampling`]'s rule: greedy, temperature, top-k, top-p, the
//! request's seeded uniform number), so a decode step copies back token ids
//! only unless a request wants logprobs or penalties.
//!
//! Decode steps (one token per sequence, no KV streaming) replay CUDA graphs
//! captured per batch-size bucket: every pointer the step uses is fixed, the
//! step's inputs are copied to fixed device buffers before the replay, and
//! decode attention's grid depends on the batch alone (each block reads the
//! context length on the device), so a sequence growing through any context
//! length keeps replaying the same graph instead of capturing new ones in the
//! middle of serving. Everything runs on one stream; every public call binds
//! the context to the calling thread first, so the backend can move to the
//! engine thread.
//!
//! cudarc loads the CUDA libraries at run time (`dynamic-loading`), so this
//! module builds and its host-side logic is tested on machines without CUDA;
//! opening a device there fails with an error naming the missing library.

pub mod bench;
pub mod check;
mod device;
pub mod ipc;
mod lt;
mod nccl;
pub mod tp;
pub mod tp_check;
mod weights;

pub(crate) use device::check_gpus;

use std::collections::HashMap;

use cudarc::driver::{CudaGraph, LaunchConfig, PushKernelArg};

use super::{
    check_blocks_in_pool, check_kv_layer, check_sampling_rows, BackendError, ComputeBackend,
    DeviceSampling, KvLayerSink, SeqInput,
};
use device::{
    alloc, alloc_pinned, decode_v2_index, gemv_index, kv_box_rows, kv_tensor_map, DeviceBuffer,
    Dtype, Gpu, PinnedBuffer, TmaMap, DECODE_V2_GROUPS, MAX_ATTENTION_SMEM,
};
pub use tandem_api::args::{DeviceArgs, DeviceSpec, LoadFormat};
use tandem_api::types::{KvDtype, KvExport, KvLayerChunk, KvPieces};
use tandem_model::{ModelConfig, Weights};
use weights::DeviceWeights;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library is missing; the message names it.
    #[error("{0}")]
    NoLibrary(String),
    #[error("no such CUDA device: {0}")]
    NoDevice(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLAS: {0}")]
    Blas(String),
    #[error("NVRTC could not compile the kernels: {0}")]
    Compile(String),
    #[error("out of device memory: {0}")]
    OutOfMemory(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("step too large for the planned workspace: {0}")]
    StepTooLarge(String),
    #[error("invalid option: {0}")]
    Option(String),
    #[error("NCCL: {0}")]
    Nccl(String),
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        CudaError::Driver(e.to_string())
    }
}

impl From<cudarc::cublas::result::CublasError> for CudaError {
    fn from(e: cudarc::cublas::result::CublasError) -> Self {
        CudaError::Blas(format!("{e:?}"))
    }
}

/// How a CUDA backend plans its memory and runs steps.
#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    /// Tokens per forward step at most (the engine's `max_batch_tokens`; a
    /// single prefill of N tokens needs N).
    pub max_batch_tokens: usize,
    /// Sequences per step at most (the engine's `max_num_seqs`).
    pub max_num_seqs: usize,
    /// Longest sequence; sizes block tables and decode-attention splits.
    pub max_model_len: usize,
    /// Fraction of device memory for weights + workspace + KV pool.
    pub gpu_memory_utilization: f32,
    /// Replay CUDA graphs for decode steps.
    pub cuda_graphs: bool,
    /// GPUs the model is sharded over (1: no tensor parallelism).
    pub tensor_parallel_size: usize,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            max_batch_tokens: 512,
            max_num_seqs: 64,
            max_model_len: 4096,
            gpu_memory_utilization: 0.9,
            cuda_graphs: true,
            tensor_parallel_size: 1,
        }
    }
}

/// Launches kernel `$func` of `$gpu` with the arguments in order, in one
/// expression so every argument temporary outlives the launch.
///
/// Safety: the caller's arguments must match the kernel's signature in
/// llama.cu, and every pointer must address a live buffer of the size the
/// kernel indexes for that launch geometry.
macro_rules! launch {
    ($gpu:expr, $func:ident, $cfg:expr; $($arg:expr),* $(,)?) => {
        // SAFETY: see the macro's contract; every call site documents its sizes.
        unsafe {
            $gpu.stream
                .launch_builder(&$gpu.kernels.$func)
                $(.arg(&$arg))*
                .launch($cfg)
        }
        .map(|_| ())
        .map_err(CudaError::from)
    };
}

/// Launches the kernel `$func` (a `CudaFunction` expression) like
/// [`launch!`], as a programmatic dependent launch when `$early` (only for
/// kernels that call `pdl_wait` first, see llama.cu).
macro_rules! launch_fn {
    ($gpu:expr, $early:expr, $func:expr, $cfg:expr; $($arg:expr),* $(,)?) => {
        // SAFETY: as for `launch!`; every argument temporary lives until the
        // end of this statement, past the launch.
        unsafe {
            $gpu.launch_ex(
                &$func,
                $cfg,
                $early,
                &mut [$(&$arg as *const _ as *mut std::ffi::c_void),*],
            )
        }
    };
}

/// Records a profiling mark named `$name` after the operations enqueued so far.
macro_rules! mark {
    ($self:ident, $name:expr) => {
        if let Some(p) = $self.profiler.as_mut() {
            p.mark($name, &$self.gpu)?;
        }
    };
}

/// Positions of one decode-attention split (`DECODE_PARTITION` in llama.cu)
/// and the warps of one decode-attention block (`DECODE_WARPS`).
const DECODE_PARTITION: usize = 64;
const DECODE_WARPS: usize = 8;
/// Fewest positions a split of the context-independent decode attention
/// takes (`DECODE_MIN_CHUNK` in llama.cu): a sequence uses
/// `min(splits, max(1, ctx / DECODE_MIN_CHUNK))` splits.
const DECODE_MIN_CHUNK: usize = 128;
/// Query rows per tile of the scalar prefill-attention kernel (`PF_Q` in
/// llama.cu); the tensor-core kernel's tiles depend on the GQA group, see
/// [`prefill_tile`].
const PREFILL_TILE: usize = 16;
const PREFILL_KEYS: usize = 32;
/// Threads per block of the prefill attention kernel (16 rows x 8).
const PREFILL_THREADS: u32 = 128;
/// Threads of a `sample_rows` block (`SAMPLE_THREADS` in llama.cu).
const SAMPLE_THREADS: u32 = 1024;
/// Warps of a fused-projection block (`GEMV_WARPS` in llama.cu).
const GEMV_WARPS: usize = 8;

/// Fixed device buffers of one step, sized for the largest step planned.
struct Workspace {
    x: DeviceBuffer,
    normed: DeviceBuffer,
    qkv: DeviceBuffer,
    attn: DeviceBuffer,
    gate_up: DeviceBuffer,
    act: DeviceBuffer,
    kv_out: DeviceBuffer,
    /// The step's RoPE (cos, sin) per token and frequency (`rope_table`).
    rope_cs: DeviceBuffer,
    part_max: DeviceBuffer,
    part_sum: DeviceBuffer,
    part_out: DeviceBuffer,
    /// Finished decode-attention splits per (sequence, KV head); zero
    /// between steps (the last split resets its counter).
    split_counters: DeviceBuffer,
    logits: DeviceBuffer,
    next_tokens: DeviceBuffer,
}

/// Offsets (in i32 elements) of the step inputs inside one device buffer,
/// copied from pinned memory in one transfer per step.
#[derive(Debug, Clone, Copy)]
struct InputLayout {
    max_tokens: usize,
    max_seqs: usize,
    max_tiles: usize,
    /// Block-table entries per sequence.
    max_blocks: usize,
}

impl InputLayout {
    fn tokens(&self) -> usize {
        0
    }
    fn positions(&self) -> usize {
        self.max_tokens
    }
    fn slots(&self) -> usize {
        2 * self.max_tokens
    }
    fn logit_rows(&self) -> usize {
        3 * self.max_tokens
    }
    fn tile_seq(&self) -> usize {
        self.logit_rows() + self.max_seqs
    }
    fn tile_row0(&self) -> usize {
        self.tile_seq() + self.max_tiles
    }
    fn tile_rows(&self) -> usize {
        self.tile_row0() + self.max_tiles
    }
    /// [`SAMPLING_WORDS`] per output-head row: how `sample_rows` picks it.
    fn sampling(&self) -> usize {
        self.tile_rows() + self.max_tiles
    }
    fn block_tables(&self) -> usize {
        self.sampling() + SAMPLING_WORDS * self.max_seqs
    }
    fn len(&self) -> usize {
        self.block_tables() + self.max_seqs * self.max_blocks
    }
}

struct KvPool {
    block_size: usize,
    num_blocks: usize,
    /// K and V of every layer: `[layer][k|v][num_blocks * block_size, kv_dim]`.
    data: DeviceBuffer,
    /// `data` as one TMA tensor map of `2 * layers * num_blocks * block_size`
    /// rows, for the wgmma prefill kernel (when it runs).
    tma: Option<TmaMap>,
    layout: InputLayout,
    inputs: DeviceBuffer,
    host_inputs: PinnedBuffer,
}

/// A decode graph, replayable while its pointers stay valid (until the KV
/// pool is reallocated).
struct DecodeGraph(CudaGraph);

// SAFETY: a graph is used only by the thread that owns the backend, one call
// at a time; CUDA allows using it from another thread with the context bound.
unsafe impl Send for DecodeGraph {}

/// 32-bit words of one row's sampling rule ([`DeviceSampling::to_words`]).
const SAMPLING_WORDS: usize = 5;

/// What a step returns to the host.
enum StepOutput<'a> {
    Logits(&'a mut Vec<f32>),
    /// Token ids picked on the device, by these rules (one per sequence
    /// wanting logits; `None`: greedy).
    Sampled(Option<&'a [DeviceSampling]>, &'a mut Vec<u32>),
}

/// The host-side plan of one step, validated against the pool.
struct StepPlan {
    tokens: usize,
    seqs: usize,
    decode: bool,
    /// Splits of decode attention (0 for prefill steps).
    splits: usize,
    logit_rows: Vec<usize>,
    tiles: usize,
    /// Row range of each sequence.
    seq_rows: Vec<(usize, usize)>,
}

pub struct CudaBackend {
    cfg: ModelConfig,
    opts: CudaOptions,
    // Field order is drop order: graphs and buffers go before the context.
    graphs: HashMap<(usize, usize), DecodeGraph>,
    /// Key of the graph the last decode step replayed.
    last_graph: Option<(usize, usize)>,
    kv: Option<KvPool>,
    ws: Workspace,
    inv_freq: DeviceBuffer,
    host_logits: PinnedBuffer,
    host_kv: Vec<PinnedBuffer>,
    weights: DeviceWeights,
    kv_budget: usize,
    /// Per-operation GPU time, when profiling (eager steps only).
    profiler: Option<Profiler>,
    /// Writes prompts' KV into peers' pools (cuda-ipc), made on first use.
    peer_writer: Option<ipc::PeerWriter>,
    /// Fused projections for steps of 1, 2 or 4 tokens (see llama.cu).
    fused_gemv: bool,
    /// Multi-token steps keep the gate/up GEMM's output in f32 up to
    /// SiLU·mul instead of rounding it to bf16 ([`f32_gate_up_switch`]).
    f32_gate_up: bool,
    /// Programmatic dependent launches for the kernels that support them.
    pdl: bool,
    /// At most this many blocks in a fused-projection grid
    /// (`TANDEM_CUDA_GEMV_MAX_BLOCKS`, for measuring and checking); unset,
    /// two per SM.
    gemv_max_blocks: Option<usize>,
    /// With early launch, fused projections ask for enough shared memory
    /// that at most this many of their blocks share an SM
    /// (`TANDEM_CUDA_GEMV_RESIDENT`, default [`GEMV_RESIDENT`], 0 for no
    /// limit; see [`gemv_smem_floor`]).
    gemv_resident: Option<usize>,
    /// The prefill-attention kernel for this model and GPU ([`prefill_kernel`]).
    prefill_preferred: PrefillKernel,
    /// The one multi-token steps run with the current KV pool: the wgmma
    /// kernel needs the pool's TMA map, else mma.sync stands in.
    prefill: PrefillKernel,
    /// This backend's rank in a tensor-parallel group: it holds a shard of
    /// the model and sums the output and down projections with its peers.
    tp: Option<nccl::RankComm>,
    gpu: Gpu,
}

/// Times the operations of eager steps with CUDA events: an event after each
/// operation; the time between two events is charged to the later one's name.
struct Profiler {
    marks: Vec<(&'static str, cudarc::driver::CudaEvent)>,
    totals: Vec<(&'static str, f64)>,
    steps: usize,
    graphs_were_on: bool,
}

impl Profiler {
    fn mark(&mut self, name: &'static str, gpu: &Gpu) -> Result<(), CudaError> {
        self.marks.push((name, gpu.timing_event()?));
        Ok(())
    }

    /// Adds up a finished step's marks (the stream has been synchronised).
    fn collect(&mut self) -> Result<(), CudaError> {
        for pair in self.marks.windows(2) {
            let ms = pair[0].1.elapsed_ms(&pair[1].1)? as f64;
            match self.totals.iter_mut().find(|(n, _)| *n == pair[1].0) {
                Some((_, t)) => *t += ms,
                None => self.totals.push((pair[1].0, ms)),
            }
        }
        self.marks.clear();
        self.steps += 1;
        Ok(())
    }
}

fn max_tiles(opts: &CudaOptions) -> usize {
    opts.max_batch_tokens / PREFILL_TILE + opts.max_num_seqs
}

fn max_splits(opts: &CudaOptions) -> usize {
    opts.max_model_len
        .div_ceil(DECODE_PARTITION)
        .next_power_of_two()
}

/// The decode-attention grid's splits (its z dimension) for a step of `seqs`
/// sequences: a function of the batch alone, never of the context, so a
/// captured graph serves every context length. With the context-independent
/// kernel, as many splits as keep `seqs × kv_heads × splits` blocks within
/// one wave of one block per SM (its register use allows one; a block keeps
/// 32-64 KiB of loads in flight, enough to stream at full bandwidth), at least
/// one; a sequence uses fewer when its context is short (see
/// [`DECODE_MIN_CHUNK`]), the others returning at once. With the older kernel (head dims it
/// does not cover), every split the longest context may need, the unused
/// ones returning at once.
fn decode_splits(cfg: &ModelConfig, opts: &CudaOptions, num_sms: u32, seqs: usize) -> usize {
    let group = cfg.num_heads / cfg.num_kv_heads.max(1);
    if decode_v2_index(cfg.head_dim, group).is_none() {
        return max_splits(opts);
    }
    let blocks_per_split = seqs.max(1) * cfg.num_kv_heads.max(1);
    (num_sms as usize / blocks_per_split)
        .clamp(1, opts.max_model_len.div_ceil(DECODE_MIN_CHUNK).max(1))
}

/// Partial results (rows of head_dim floats) decode attention may write in
/// one step: the most over every batch size of sequences × heads × splits.
fn decode_part_rows(cfg: &ModelConfig, opts: &CudaOptions, num_sms: u32) -> usize {
    (1..=opts.max_num_seqs)
        .map(|n| n * cfg.num_heads * decode_splits(cfg, opts, num_sms, n))
        .max()
        .unwrap_or(0)
}

/// The CUDA graph a decode step of `seqs` sequences replays: its batch
/// bucket and decode attention's splits. Neither depends on the context.
fn decode_graph_key(
    cfg: &ModelConfig,
    opts: &CudaOptions,
    num_sms: u32,
    seqs: usize,
    max_seqs: usize,
) -> (usize, usize) {
    let bucket = graph_bucket(seqs, max_seqs);
    (bucket, decode_splits(cfg, opts, num_sms, bucket))
}

impl CudaBackend {
    /// Opens `cuda:ordinal`, uploads `weights` (converted to bf16) and plans
    /// the workspace for `opts`.
    pub fn new(
        ordinal: usize,
        cfg: ModelConfig,
        weights: &Weights,
        opts: CudaOptions,
    ) -> Result<Self, BackendError> {
        super::check_weights(&cfg, weights)?;
        let gpu = Gpu::open(ordinal)?;
        let w = DeviceWeights::upload(&gpu, &cfg, weights)?;
        Self::assemble(gpu, cfg, w, opts)
    }

    /// Opens `cuda:ordinal` with random weights of `cfg`'s shape generated on
    /// the device from `seed` (`--load-format dummy`).
    pub fn new_dummy(
        ordinal: usize,
        cfg: ModelConfig,
        seed: u64,
        opts: CudaOptions,
    ) -> Result<Self, BackendError> {
        let gpu = Gpu::open(ordinal)?;
        let w = DeviceWeights::random(&gpu, &cfg, seed)?;
        Self::assemble(gpu, cfg, w, opts)
    }

    fn assemble(
        gpu: Gpu,
        cfg: ModelConfig,
        weights: DeviceWeights,
        mut opts: CudaOptions,
    ) -> Result<Self, BackendError> {
        check_geometry(&cfg)?;
        if opts.max_num_seqs == 0 || opts.max_batch_tokens == 0 || opts.max_model_len == 0 {
            return Err(CudaError::Option(format!("{opts:?}: sizes must be positive")).into());
        }
        opts.max_batch_tokens = opts.max_batch_tokens.max(opts.max_num_seqs);
        let (m, s) = (opts.max_batch_tokens, opts.max_num_seqs);
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (q_dim, kv_dim, f) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let part_rows = decode_part_rows(&cfg, &opts, gpu.num_sms);
        let ws = Workspace {
            x: alloc(m * h * 4)?,
            normed: alloc(m * h * 2)?,
            qkv: alloc(m * (q_dim + 2 * kv_dim) * 4)?,
            attn: alloc(m * q_dim * 2)?,
            // f32 when the gate/up GEMM writes f32 (see `f32_gate_up`).
            gate_up: alloc(m * 2 * f * if f32_gate_up_switch() { 4 } else { 2 })?,
            act: alloc(m * f * 2)?,
            kv_out: alloc(m * 2 * kv_dim * 4)?,
            rope_cs: alloc(m * hd / 2 * 8)?,
            part_max: alloc(part_rows * 4)?,
            part_sum: alloc(part_rows * 4)?,
            part_out: alloc(part_rows * hd * 4)?,
            split_counters: alloc(s * nkv * 4)?,
            logits: alloc(s * cfg.vocab_size * 4)?,
            next_tokens: alloc(s * 4)?,
        };
        gpu.zero(&ws.split_counters)?;
        let inv_freq = gpu.upload(&super::cpu::rope_inv_freq(&cfg))?;
        let host_logits = alloc_pinned(s * cfg.vocab_size * 4)?;
        let (free, total) = gpu.memory()?;
        // The KV pool gets what the utilisation leaves after weights and
        // workspace; a little is held back for cuBLAS and graph resources.
        let reserve = 256 << 20;
        let allowed_used = (total as f64 * opts.gpu_memory_utilization as f64) as usize;
        let used = total - free;
        let kv_budget = allowed_used.saturating_sub(used + reserve);
        tracing::info!(
            device = %gpu.name,
            arch = gpu.arch,
            weights_mib = weights.bytes() >> 20,
            kv_budget_mib = kv_budget >> 20,
            "CUDA backend ready"
        );
        let gemv_resident = match std::env::var("TANDEM_CUDA_GEMV_RESIDENT") {
            Ok(v) => v.parse::<usize>().ok().filter(|&n| n > 0),
            Err(_) => Some(GEMV_RESIDENT),
        };
        let prefill = prefill_kernel(&cfg, gpu.kernels.prefill_attention_wg.is_some());
        tracing::debug!(?prefill, "prefill attention kernel");
        let mut backend = Self {
            cfg,
            opts,
            graphs: HashMap::new(),
            last_graph: None,
            kv: None,
            ws,
            inv_freq,
            host_logits,
            host_kv: Vec::new(),
            weights,
            kv_budget,
            profiler: None,
            peer_writer: None,
            fused_gemv: env_switch("TANDEM_CUDA_FUSED_GEMV", true),
            f32_gate_up: f32_gate_up_switch(),
            // Set below by set_pdl, with the fused projections' carveout.
            pdl: false,
            gemv_max_blocks: std::env::var("TANDEM_CUDA_GEMV_MAX_BLOCKS")
                .ok()
                .and_then(|v| v.parse().ok()),
            gemv_resident,
            prefill_preferred: prefill,
            prefill,
            tp: None,
            gpu,
        };
        // Needs compute capability 9.0 or newer (set_pdl checks).
        backend.set_pdl(env_switch("TANDEM_CUDA_PDL", true))?;
        Ok(backend)
    }

    /// Makes this backend rank `comm.rank` of a tensor-parallel group: its
    /// weights are that rank's shard ([`tp::shard_weights`]), and after the
    /// output and down projections the ranks' partial sums are all-reduced
    /// (rank 0 adds the residual, the others contribute their share alone).
    fn join_tensor_parallel_group(&mut self, comm: nccl::RankComm) {
        self.graphs.clear();
        self.tp = Some(comm);
    }

    /// The GPU's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn device_name(&self) -> &str {
        &self.gpu.name
    }

    /// The prefill-attention kernel multi-token steps run: `wgmma`,
    /// `mma.sync` or `scalar`.
    pub fn prefill_kernel_name(&self) -> &'static str {
        match self.prefill {
            PrefillKernel::Wgmma => "wgmma",
            PrefillKernel::TensorCore => "mma.sync",
            PrefillKernel::Scalar => "scalar",
        }
    }

    /// Bytes of device memory the weights occupy.
    pub fn weight_bytes(&self) -> usize {
        self.weights.bytes()
    }

    /// Device memory left for the KV pool under `--gpu-memory-utilization`.
    pub fn kv_budget_bytes(&self) -> usize {
        self.kv_budget
    }

    /// Runs one step like [`ComputeBackend::forward`], but picks each
    /// sequence's next token on the device (greedy) and copies back only the
    /// token ids, one per sequence with `need_logits`, in batch order.
    pub fn forward_greedy(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<u32>, BackendError> {
        let mut out = Vec::new();
        self.step(batch, StepOutput::Sampled(None, &mut out), None)?;
        Ok(out)
    }

    /// Turns decode CUDA graphs on or off (for measuring what they save).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.opts.cuda_graphs = on;
    }

    /// Turns the fused small-batch projections (steps of 1, 2 or 4 tokens)
    /// on or off; off, every projection is a cuBLAS GEMM (for comparing).
    pub fn set_fused_gemv(&mut self, on: bool) {
        if self.fused_gemv != on {
            // Captured graphs hold the other path's kernels.
            self.graphs.clear();
        }
        self.fused_gemv = on;
    }

    /// Caps the fused projections' grids at `blocks` blocks (`None`: two per
    /// SM). One block makes each warp loop over many row pairs, which small
    /// check models otherwise never do.
    pub fn set_gemv_max_blocks(&mut self, blocks: Option<usize>) {
        if self.gemv_max_blocks != blocks {
            self.graphs.clear();
        }
        self.gemv_max_blocks = blocks;
    }

    /// Whether decode kernels launch early (programmatic dependent launch).
    pub fn pdl(&self) -> bool {
        self.pdl
    }

    /// Turns programmatic dependent launches on or off (compute capability
    /// 9.0 and newer; off elsewhere): each decode kernel starts, and
    /// prefetches its weights, while the previous one finishes; off, kernels
    /// start one after the other. With them on, the fused projections are
    /// held to `gemv_resident` blocks an SM ([`gemv_smem_floor`]), which
    /// needs all of an SM's L1/shared memory given to shared memory.
    pub fn set_pdl(&mut self, on: bool) -> Result<(), BackendError> {
        let on = on && !self.gpu.arch.starts_with("sm_8");
        if self.pdl != on {
            self.graphs.clear();
        }
        self.pdl = on;
        // CU_SHAREDMEM_CARVEOUT_DEFAULT (-1) leaves the choice to the driver.
        let carveout = if self.gemv_floor() > 0 { 100 } else { -1 };
        let kernels = &self.gpu.kernels;
        for k in kernels
            .gemv_qkv
            .iter()
            .chain(&kernels.gemv_silu)
            .chain(&kernels.gemv_out)
        {
            k.set_attribute(
                cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                carveout,
            )
            .map_err(CudaError::from)?;
        }
        Ok(())
    }

    /// Shared memory each fused-projection block asks for at least: with
    /// early launch on, enough to hold them to `gemv_resident` an SM; else 0.
    fn gemv_floor(&self) -> u32 {
        match (self.pdl, self.gemv_resident) {
            (true, Some(n)) => gemv_smem_floor(self.gpu.smem_per_sm, n),
            _ => 0,
        }
    }

    /// Runs the device sampler alone: row `i` of `logits` (`[rows, vocab]`,
    /// at most `max_num_seqs` rows) is sampled by `sampling[i]`. For checking
    /// the kernel against [`super::sampling::sample_row`].
    pub fn sample_logits(
        &mut self,
        logits: &[f32],
        sampling: &[DeviceSampling],
    ) -> Result<Vec<u32>, BackendError> {
        let vocab = self.cfg.vocab_size;
        let rows = sampling.len();
        if logits.len() != rows * vocab || rows > self.opts.max_num_seqs {
            return Err(BackendError::SamplingRows {
                sampling: rows,
                rows: logits.len() / vocab.max(1),
            });
        }
        if rows == 0 {
            return Ok(Vec::new());
        }
        self.gpu.bind()?;
        self.gpu.copy_to(&self.ws.logits, 0, logits)?;
        let words: Vec<i32> = sampling.iter().flat_map(|s| s.to_words()).collect();
        let params = self.gpu.upload(&words)?;
        self.launch_sampler(rows, params.ptr())?;
        let mut ids = vec![0i32; rows];
        self.gpu.copy_from(self.ws.next_tokens.ptr(), &mut ids)?;
        self.gpu.synchronize()?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }

    /// Enqueues `sample_rows` over the first `rows` rows of the logits
    /// workspace with the rules at device address `params`.
    fn launch_sampler(&self, rows: usize, params: u64) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (next, logits, vocab) = (
            self.ws.next_tokens.ptr(),
            self.ws.logits.ptr(),
            self.cfg.vocab_size as i32,
        );
        launch_fn!(self.gpu, self.pdl, self.gpu.kernels.sample_rows, cfg; next, logits, params, vocab)
    }

    /// Starts timing each operation of the following steps (run eagerly,
    /// without CUDA graphs, while profiling).
    pub fn start_profile(&mut self) {
        self.profiler = Some(Profiler {
            marks: Vec::new(),
            totals: Vec::new(),
            steps: 0,
            graphs_were_on: self.opts.cuda_graphs,
        });
        self.opts.cuda_graphs = false;
    }

    /// Stops profiling: GPU milliseconds per step of each operation, largest
    /// first (the gap before an operation's kernels, such as waiting for the
    /// host to launch them, counts as that operation's).
    pub fn take_profile(&mut self) -> Vec<(String, f64)> {
        let Some(p) = self.profiler.take() else {
            return Vec::new();
        };
        self.opts.cuda_graphs = p.graphs_were_on;
        let mut out: Vec<(String, f64)> = p
            .totals
            .iter()
            .map(|(n, t)| (n.to_string(), t / p.steps.max(1) as f64))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1));
        out
    }

    /// Number of CUDA graphs captured so far (one per decode bucket seen).
    pub fn captured_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Device time in ms of one replay of the last decode step's graph,
    /// timed over `n` replays back to back (the same step again: same
    /// tokens, same cache slots). What a step costs the GPU without the
    /// host's share (inputs, launch, copying the tokens back); `None` when no
    /// graph has run yet.
    pub fn time_last_graph(&self, n: usize) -> Result<Option<f64>, BackendError> {
        let Some(graph) = self.last_graph.and_then(|k| self.graphs.get(&k)) else {
            return Ok(None);
        };
        self.gpu.bind()?;
        graph.0.launch().map_err(CudaError::from)?;
        let start = self.gpu.timing_event()?;
        for _ in 0..n {
            graph.0.launch().map_err(CudaError::from)?;
        }
        let end = self.gpu.timing_event()?;
        end.synchronize().map_err(CudaError::from)?;
        let ms = start.elapsed_ms(&end).map_err(CudaError::from)? as f64;
        Ok(Some(ms / n.max(1) as f64))
    }

    /// The KV pool's geometry as the cuda-ipc transport describes it.
    fn ipc_layout(&self, pool: &KvPool) -> ipc::KvPoolLayout {
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

    fn init_peer_writer(&mut self) -> Result<(), BackendError> {
        if self.peer_writer.is_none() {
            self.peer_writer = Some(ipc::PeerWriter::new(&self.gpu)?);
        }
        Ok(())
    }

    fn pool(&self) -> Result<&KvPool, BackendError> {
        self.kv.as_ref().ok_or(BackendError::KvCacheNotInitialised)
    }

    fn layer_cache(&self, pool: &KvPool, layer: usize) -> (u64, u64) {
        let per =
            (pool.num_blocks * pool.block_size * self.cfg.num_kv_heads * self.cfg.head_dim * 2)
                as u64;
        let base = pool.data.ptr() + 2 * layer as u64 * per;
        (base, base + per)
    }

    /// Validates the batch and writes its inputs to the pinned staging area.
    fn plan(
        &mut self,
        batch: &[SeqInput<'_>],
        allow_graph: bool,
        sampling: Option<&[DeviceSampling]>,
    ) -> Result<(StepPlan, Option<usize>), BackendError> {
        let cfg = &self.cfg;
        let opts = &self.opts;
        let num_sms = self.gpu.num_sms;
        let pool = self
            .kv
            .as_mut()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        let layout = pool.layout;
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let decode = !batch.is_empty() && batch.iter().all(|s| s.tokens.len() == 1);
        let tile_len = prefill_tile(cfg, self.prefill);
        let tiles: usize = batch
            .iter()
            .map(|s| s.tokens.len().div_ceil(tile_len))
            .sum();
        if tokens > layout.max_tokens || batch.len() > layout.max_seqs || tiles > layout.max_tiles {
            return Err(CudaError::StepTooLarge(format!(
                "{tokens} tokens in {} sequences; planned for {} tokens and {} sequences",
                batch.len(),
                layout.max_tokens,
                layout.max_seqs
            ))
            .into());
        }
        let max_ctx = batch
            .iter()
            .map(|s| s.start_pos + s.tokens.len())
            .max()
            .unwrap_or(0);
        if max_ctx > opts.max_model_len {
            return Err(CudaError::StepTooLarge(format!(
                "a context of {max_ctx} tokens; planned for {}",
                opts.max_model_len
            ))
            .into());
        }
        let bucket = (allow_graph && decode && opts.cuda_graphs)
            .then(|| graph_bucket(batch.len(), layout.max_seqs));
        let rows = bucket.unwrap_or(tokens);
        // Eager decode steps use their bucket's splits too, so a graph
        // replay and an eager step compute the same sums in the same order.
        let splits = if decode {
            decode_splits(
                cfg,
                opts,
                num_sms,
                graph_bucket(batch.len(), layout.max_seqs),
            )
        } else {
            0
        };
        let host: &mut [i32] = pool.host_inputs.as_mut_slice(layout.len());
        let mut seq_rows = Vec::with_capacity(batch.len());
        let mut logit_rows = Vec::new();
        let mut row = 0;
        let mut tile = 0;
        for (si, seq) in batch.iter().enumerate() {
            let ctx = seq.start_pos + seq.tokens.len();
            let needed = ctx.div_ceil(pool.block_size);
            if seq.block_table.len() < needed {
                return Err(BackendError::BlockTableTooShort {
                    blocks: seq.block_table.len(),
                    tokens: ctx,
                    block_size: pool.block_size,
                });
            }
            let bt =
                &mut host[layout.block_tables() + si * layout.max_blocks..][..layout.max_blocks];
            bt.fill(0);
            for (dst, &b) in bt.iter_mut().zip(&seq.block_table[..needed]) {
                if b as usize >= pool.num_blocks {
                    return Err(BackendError::BlockOutOfRange {
                        block: b,
                        num_blocks: pool.num_blocks,
                    });
                }
                *dst = b as i32;
            }
            for (i, &tok) in seq.tokens.iter().enumerate() {
                if tok as usize >= cfg.vocab_size {
                    return Err(BackendError::TokenOutOfRange {
                        token: tok,
                        vocab: cfg.vocab_size,
                    });
                }
                let pos = seq.start_pos + i;
                let block = seq.block_table[pos / pool.block_size] as usize;
                host[layout.tokens() + row + i] = tok as i32;
                host[layout.positions() + row + i] = pos as i32;
                host[layout.slots() + row + i] =
                    (block * pool.block_size + pos % pool.block_size) as i32;
            }
            let n = seq.tokens.len();
            for t0 in (0..n).step_by(tile_len) {
                host[layout.tile_seq() + tile] = si as i32;
                host[layout.tile_row0() + tile] = (row + t0) as i32;
                host[layout.tile_rows() + tile] = tile_len.min(n - t0) as i32;
                tile += 1;
            }
            if seq.need_logits && n > 0 {
                logit_rows.push(row + n - 1);
            }
            seq_rows.push((row, n));
            row += n;
        }
        // Padding rows of a graph bucket: token 0 at position 0, no cache write.
        for r in tokens..rows {
            host[layout.tokens() + r] = 0;
            host[layout.positions() + r] = 0;
            host[layout.slots() + r] = -1;
            host[layout.block_tables() + r * layout.max_blocks..][..layout.max_blocks].fill(0);
        }
        let n_logits = if bucket.is_some() {
            rows
        } else {
            logit_rows.len()
        };
        for i in 0..n_logits {
            host[layout.logit_rows() + i] = if bucket.is_some() {
                i as i32
            } else {
                logit_rows[i] as i32
            };
        }
        // Sampling rule of each output-head row: greedy unless given. Under a
        // graph the head's rows are the token rows, else the sequences
        // wanting logits in order.
        let words = &mut host[layout.sampling()..][..SAMPLING_WORDS * layout.max_seqs];
        let greedy = DeviceSampling::GREEDY.to_words();
        for r in 0..n_logits {
            words[r * SAMPLING_WORDS..][..SAMPLING_WORDS].copy_from_slice(&greedy);
        }
        for (i, rule) in sampling.unwrap_or_default().iter().enumerate() {
            let head_row = if bucket.is_some() { logit_rows[i] } else { i };
            words[head_row * SAMPLING_WORDS..][..SAMPLING_WORDS].copy_from_slice(&rule.to_words());
        }
        let plan = StepPlan {
            tokens: rows,
            seqs: if bucket.is_some() { rows } else { batch.len() },
            decode,
            splits,
            logit_rows,
            tiles: tile,
            seq_rows,
        };
        Ok((plan, bucket))
    }

    /// Copies the staged inputs of a step with `seqs` sequences to the device.
    fn upload_inputs(&self, seqs: usize) -> Result<(), BackendError> {
        let pool = self.pool()?;
        let n = pool.layout.block_tables() + seqs * pool.layout.max_blocks;
        let host: &[i32] = pool.host_inputs.as_slice(n);
        self.gpu.copy_to(&pool.inputs, 0, host)?;
        Ok(())
    }

    fn step(
        &mut self,
        batch: &[SeqInput<'_>],
        out: StepOutput<'_>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        self.gpu.bind()?;
        let sampling = match &out {
            StepOutput::Sampled(rules, _) => *rules,
            StepOutput::Logits(_) => None,
        };
        if let Some(rules) = sampling {
            check_sampling_rows(batch, rules)?;
        }
        let (plan, bucket) = self.plan(batch, sink.is_none(), sampling)?;
        if plan.tokens == 0 {
            match out {
                StepOutput::Logits(l) => l.clear(),
                StepOutput::Sampled(_, t) => t.clear(),
            }
            return Ok(());
        }
        self.upload_inputs(plan.seqs)?;
        // Rows of the output head: all bucket rows under a graph, else the
        // last token of each sequence that asked for logits.
        let head_rows = if bucket.is_some() {
            plan.tokens
        } else {
            plan.logit_rows.len()
        };
        match bucket {
            Some(b) => {
                let key = decode_graph_key(
                    &self.cfg,
                    &self.opts,
                    self.gpu.num_sms,
                    batch.len(),
                    self.kv.as_ref().map_or(b, |p| p.layout.max_seqs),
                );
                debug_assert_eq!(key, (b, plan.splits));
                if !self.graphs.contains_key(&key) {
                    // An eager run first: cuBLAS picks and initialises its
                    // kernels outside the capture.
                    self.enqueue(&plan, head_rows, None)?;
                    self.gpu.synchronize()?;
                    let graph = self.capture(&plan, head_rows)?;
                    self.graphs.insert(key, graph);
                }
                self.graphs[&key].0.launch().map_err(CudaError::from)?;
                self.last_graph = Some(key);
            }
            None => {
                self.last_graph = None;
                self.enqueue(&plan, head_rows, sink)?
            }
        }
        // Rows of the head output that belong to sequences wanting logits.
        let wanted: Vec<usize> = if bucket.is_some() {
            plan.logit_rows
                .iter()
                .map(|&r| {
                    plan.seq_rows
                        .iter()
                        .position(|&(start, n)| start + n - 1 == r)
                        .expect("logit row belongs to a sequence")
                })
                .collect()
        } else {
            (0..head_rows).collect()
        };
        if let Some(p) = self.profiler.as_mut() {
            self.gpu.synchronize()?;
            p.collect()?;
        }
        let vocab = self.cfg.vocab_size;
        match out {
            StepOutput::Logits(logits) => {
                let n = wanted.last().map_or(0, |&r| r + 1);
                let host: &mut [f32] = self.host_logits.as_mut_slice(n * vocab);
                self.gpu.copy_from(self.ws.logits.ptr(), host)?;
                self.gpu.synchronize()?;
                logits.clear();
                logits.reserve(wanted.len() * vocab);
                let host: &[f32] = self.host_logits.as_slice(n * vocab);
                for &r in &wanted {
                    logits.extend_from_slice(&host[r * vocab..(r + 1) * vocab]);
                }
            }
            StepOutput::Sampled(_, tokens) => {
                // Into page-locked memory (the logits' buffer, unused here):
                // a copy to pageable memory is staged by the driver and costs
                // more than a step of a small model's kernels.
                let n = wanted.last().map_or(0, |&r| r + 1);
                let ids: &mut [i32] = self.host_logits.as_mut_slice(n);
                self.gpu.copy_from(self.ws.next_tokens.ptr(), ids)?;
                self.gpu.synchronize()?;
                let ids: &[i32] = self.host_logits.as_slice(n);
                tokens.clear();
                tokens.extend(wanted.iter().map(|&r| ids[r] as u32));
            }
        }
        Ok(())
    }

    fn capture(&mut self, plan: &StepPlan, head_rows: usize) -> Result<DecodeGraph, BackendError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags_enum, CUstreamCaptureMode_enum};
        self.gpu
            .stream
            .begin_capture(CUstreamCaptureMode_enum::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(CudaError::from)?;
        let enqueued = self.enqueue(plan, head_rows, None);
        let ended = self
            .gpu
            .stream
            .end_capture(CUgraphInstantiate_flags_enum(0));
        enqueued?;
        let graph = ended
            .map_err(CudaError::from)?
            .ok_or_else(|| CudaError::Driver("graph capture produced no graph".into()))?;
        Ok(DecodeGraph(graph))
    }

    /// Enqueues the whole forward pass of a planned step on the stream. With
    /// a sink, each layer's new K and V are copied to pinned memory and
    /// handed over while the next layer computes.
    fn enqueue(
        &mut self,
        plan: &StepPlan,
        head_rows: usize,
        mut sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        let cfg = &self.cfg;
        let gpu = &self.gpu;
        let pool = self
            .kv
            .as_ref()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        let layout = pool.layout;
        mark!(self, "start");
        let (h, hd, nh, nkv) = (
            cfg.hidden_size as i32,
            cfg.head_dim as i32,
            cfg.num_heads as i32,
            cfg.num_kv_heads as i32,
        );
        let (q_dim, kv_dim, f) = (
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        let qkv_dim = q_dim + 2 * kv_dim;
        let t = plan.tokens;
        let ws = &self.ws;
        let inputs = pool.inputs.ptr();
        let at = |off: usize| inputs + 4 * off as u64;
        let (tokens_p, positions_p, slots_p, logit_rows_p) = (
            at(layout.tokens()),
            at(layout.positions()),
            at(layout.slots()),
            at(layout.logit_rows()),
        );
        let (tile_seq_p, tile_row0_p, tile_rows_p, tables_p) = (
            at(layout.tile_seq()),
            at(layout.tile_row0()),
            at(layout.tile_rows()),
            at(layout.block_tables()),
        );
        let eps = cfg.rms_norm_eps;
        let scale = 1.0 / (cfg.head_dim as f32).sqrt();
        let (block_size, max_blocks) = (pool.block_size as i32, layout.max_blocks as i32);
        let null: u64 = 0;
        let rows_cfg = |rows: usize, threads: u32| LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // A warp's worth of threads per 16 values (RMS_VEC float4s each in
        // llama.cu), at most 1024.
        let norm_threads = (cfg.hidden_size.div_ceil(16 * 32) as u32 * 32).clamp(32, 1024);
        // Prefill steps on the wgmma attention: rope_kv_write stores the
        // rotated query scaled and in bf16 where the attention writes its
        // output (each block reads its rows' query before it writes the same
        // rows' output; no block reads another's), which is what that kernel
        // reads. So those steps run rope_kv_write, never the fused QKV
        // projection (which leaves an f32 query).
        let wgmma_step = !plan.decode && self.prefill == PrefillKernel::Wgmma;
        // Other steps of 1, 2 or 4 tokens that stream no KV run the fused
        // projections; a block of GEMV_WARPS warps stages the step's input
        // rows (width k) in shared memory, at most two blocks per SM.
        let gemv = if sink.is_none() && !wgmma_step {
            self.gemv_for(t)
        } else {
            None
        };
        let gemv_floor = self.gemv_floor();
        let gemv_cfg = |rows: usize, pairs: usize, k: usize| LaunchConfig {
            grid_dim: (
                pairs
                    .div_ceil(GEMV_WARPS)
                    .min(2 * gpu.num_sms as usize)
                    .min(self.gemv_max_blocks.unwrap_or(usize::MAX)) as u32,
                1,
                1,
            ),
            block_dim: (32 * GEMV_WARPS as u32, 1, 1),
            shared_mem_bytes: ((rows * k * 2) as u32).max(gemv_floor),
        };
        let (q_dim_i, f_i) = (q_dim as i32, f as i32);
        let pdl = self.pdl;
        // Under tensor parallelism only rank 0 adds its projections onto the
        // residual; the others write their partial sums, and the all-reduce
        // after each projection makes the residual whole on every rank.
        let adds_residual = self.tp.is_none_or(|c| c.rank == 0);
        let (accumulate, residual_beta) = if adds_residual { (1i32, 1.0) } else { (0, 0.0) };
        let reduce_rows = self.tp.map(|c| (c, t * cfg.hidden_size));

        let x = ws.x.ptr();
        launch!(gpu, embed_gather, rows_cfg(t, 256); x, self.weights.embed.ptr(), tokens_p, h)?;
        mark!(self, "embed");

        let kv_out = if sink.is_some() {
            ws.kv_out.ptr()
        } else {
            null
        };
        let q_out: u64 = if wgmma_step { ws.attn.ptr() } else { 0 };
        let rope_cs = ws.rope_cs.ptr();
        if gemv.is_none() {
            // The step's rotations, for every layer's rope_kv_write.
            let (ti, half) = (t as i32, hd / 2);
            let n = t * cfg.head_dim / 2;
            let blocks = n.div_ceil(256).min(4 * gpu.num_sms as usize);
            launch!(gpu, rope_table, rows_cfg(blocks, 256); rope_cs, self.inv_freq.ptr(), positions_p, ti, half)?;
            mark!(self, "rope_table");
        }
        let mut pending: Option<(usize, cudarc::driver::CudaEvent)> = None;
        for (li, layer) in self.weights.layers.iter().enumerate() {
            let normed = ws.normed.ptr();
            let qkv = ws.qkv.ptr();
            let (k_cache, v_cache) = self.layer_cache(pool, li);
            let bias = layer.bqkv.as_ref().map_or(0, |b| b.ptr());
            let inv_freq = self.inv_freq.ptr();
            if let Some(mi) = gemv {
                // RMSNorm, QKV, bias, RoPE and the KV write in one kernel.
                let pairs = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim / 2 + kv_dim / 2;
                launch_fn!(gpu, pdl, gpu.kernels.gemv_qkv[mi], gemv_cfg(t, pairs, cfg.hidden_size);
                    qkv, k_cache, v_cache, layer.wqkv.ptr(), bias, x, layer.attn_norm.ptr(), eps,
                    inv_freq, positions_p, slots_p, h, nh, nkv, hd)?;
                mark!(self, "norm_qkv_rope_gemv");
            } else {
                launch!(gpu, rms_norm, rows_cfg(t, norm_threads); normed, x, layer.attn_norm.ptr(), null, h, eps)?;
                mark!(self, "norm");
                gpu.gemm(
                    t,
                    qkv_dim,
                    cfg.hidden_size,
                    normed,
                    Dtype::Bf16,
                    layer.wqkv.ptr(),
                    qkv,
                    Dtype::F32,
                    0.0,
                )?;
                mark!(self, "qkv_gemm");
                launch!(gpu, rope_kv_write, rows_cfg(t, 256); qkv, bias, rope_cs, slots_p, k_cache, v_cache, kv_out, q_out, scale, nh, nkv, hd)?;
                mark!(self, "rope_kv_write");
            }

            let attn = ws.attn.ptr();
            let group = cfg.num_heads / cfg.num_kv_heads;
            if let (true, Some(ki)) = (plan.decode, decode_v2_index(cfg.head_dim, group)) {
                // Partial max and sum, then output rows, per (warp, head of
                // the group bound) for the merge across warps.
                let g = DECODE_V2_GROUPS[ki % DECODE_V2_GROUPS.len()];
                let smem = 4 * DECODE_WARPS * g * (2 + cfg.head_dim);
                let (pm, ps, po) = (ws.part_max.ptr(), ws.part_sum.ptr(), ws.part_out.ptr());
                let counters = ws.split_counters.ptr();
                let launch = LaunchConfig {
                    grid_dim: (plan.seqs as u32, nkv as u32, plan.splits as u32),
                    block_dim: (32 * DECODE_WARPS as u32, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                launch_fn!(gpu, pdl, gpu.kernels.decode_attention_v2[ki], launch;
                    qkv, k_cache, v_cache, tables_p, positions_p, pm, ps, po, counters, attn,
                    nh, nkv, block_size, max_blocks, scale)?;
            } else if plan.decode {
                let smem = 4
                    * (group * cfg.head_dim
                        + group * DECODE_PARTITION
                        + DECODE_WARPS * group * cfg.head_dim);
                let splits = plan.splits as i32;
                let (pm, ps, po) = (ws.part_max.ptr(), ws.part_sum.ptr(), ws.part_out.ptr());
                let counters = ws.split_counters.ptr();
                let launch = LaunchConfig {
                    grid_dim: (plan.seqs as u32, nkv as u32, plan.splits as u32),
                    block_dim: (32 * DECODE_WARPS as u32, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                let kernel = gpu.kernels.decode_attention[cfg.head_dim / 32 - 1]
                    .as_ref()
                    .expect("compiled for every head dim decode_attention_v2 lacks");
                launch_fn!(gpu, pdl, *kernel, launch;
                    qkv, k_cache, v_cache, tables_p, positions_p, pm, ps, po, counters, attn,
                    nh, nkv, hd, block_size, max_blocks, splits, scale)?;
            } else {
                let kernel = match (self.prefill, cfg.head_dim) {
                    (PrefillKernel::Wgmma, hd) => {
                        let wg = gpu
                            .kernels
                            .prefill_attention_wg
                            .as_ref()
                            .expect("chosen only when compiled");
                        &wg[usize::from(hd == 128)]
                    }
                    (PrefillKernel::TensorCore, 64) => &gpu.kernels.prefill_attention_tc64,
                    (PrefillKernel::TensorCore, _) => &gpu.kernels.prefill_attention_tc128,
                    (PrefillKernel::Scalar, _) => &gpu.kernels.prefill_attention,
                };
                let (threads, heads_in_grid) = prefill_block(cfg, self.prefill);
                let launch = LaunchConfig {
                    // The wgmma kernel takes its tiles along y (see llama.cu).
                    grid_dim: if self.prefill == PrefillKernel::Wgmma {
                        (heads_in_grid as u32, plan.tiles as u32, 1)
                    } else {
                        (plan.tiles as u32, heads_in_grid as u32, 1)
                    },
                    block_dim: (threads, 1, 1),
                    shared_mem_bytes: prefill_smem(cfg, self.prefill) as u32,
                };
                // The wgmma kernel reads K and V through the pool's TMA map,
                // from this layer's rows; the others through the pointers.
                let slots = pool.num_blocks * pool.block_size;
                let k_row0 = (2 * li * slots) as i32;
                let v_row0 = k_row0 + slots as i32;
                let mut args = gpu.stream.launch_builder(kernel);
                args.arg(&attn);
                match (self.prefill, pool.tma.as_ref()) {
                    // The query, as rope_kv_write left it (`q_out`).
                    (PrefillKernel::Wgmma, Some(map)) => {
                        args.arg(&q_out).arg(map).arg(&k_row0).arg(&v_row0)
                    }
                    (PrefillKernel::Wgmma, None) => {
                        unreachable!("init_kv_cache picks wgmma only with the pool's TMA map")
                    }
                    _ => args.arg(&qkv).arg(&k_cache).arg(&v_cache),
                };
                args.arg(&tables_p)
                    .arg(&positions_p)
                    .arg(&tile_seq_p)
                    .arg(&tile_row0_p)
                    .arg(&tile_rows_p)
                    .arg(&nh)
                    .arg(&nkv)
                    .arg(&hd)
                    .arg(&block_size)
                    .arg(&max_blocks);
                if self.prefill != PrefillKernel::Wgmma {
                    args.arg(&scale);
                }
                // SAFETY: as for the other launches; the prefill kernels take
                // these arguments, and the TMA map covers the whole pool (rows
                // past it read as zeros).
                unsafe { args.launch(launch) }.map_err(CudaError::from)?;
            }
            mark!(self, "attention");
            let act = ws.act.ptr();
            if let Some(mi) = gemv {
                let hp = cfg.hidden_size.div_ceil(2);
                // x += attn · wo^T
                launch_fn!(gpu, pdl, gpu.kernels.gemv_out[mi], gemv_cfg(t, hp, q_dim);
                    x, layer.wo.ptr(), attn, null, null, null, eps, q_dim_i, h, accumulate)?;
                mark!(self, "o_gemv");
                if let Some((comm, n)) = reduce_rows {
                    comm.all_reduce_sum_f32(x, n, gpu.cu_stream())?;
                    mark!(self, "all_reduce");
                }
                // act = silu(norm(x) · w_gate^T) * (norm(x) · w_up^T)
                launch_fn!(gpu, pdl, gpu.kernels.gemv_silu[mi], gemv_cfg(t, f, cfg.hidden_size);
                    act, layer.w_gate_up.ptr(), x, layer.ffn_norm.ptr(), eps, h, f_i)?;
                mark!(self, "norm_gate_up_silu_gemv");
                // x += act · w_down^T
                launch_fn!(gpu, pdl, gpu.kernels.gemv_out[mi], gemv_cfg(t, hp, f);
                    x, layer.w_down.ptr(), act, null, null, null, eps, f_i, h, accumulate)?;
                mark!(self, "down_gemv");
                if let Some((comm, n)) = reduce_rows {
                    comm.all_reduce_sum_f32(x, n, gpu.cu_stream())?;
                    mark!(self, "all_reduce");
                }
                continue;
            }
            // x += attn · wo^T
            gpu.gemm(
                t,
                cfg.hidden_size,
                q_dim,
                attn,
                Dtype::Bf16,
                layer.wo.ptr(),
                x,
                Dtype::F32,
                residual_beta,
            )?;
            mark!(self, "o_gemm");
            if let Some((comm, n)) = reduce_rows {
                comm.all_reduce_sum_f32(x, n, gpu.cu_stream())?;
                mark!(self, "all_reduce");
            }
            launch!(gpu, rms_norm, rows_cfg(t, norm_threads); normed, x, layer.ffn_norm.ptr(), null, h, eps)?;
            mark!(self, "norm");
            let gu = ws.gate_up.ptr();
            gpu.gemm(
                t,
                2 * f,
                cfg.hidden_size,
                normed,
                Dtype::Bf16,
                layer.w_gate_up.ptr(),
                gu,
                if self.f32_gate_up {
                    Dtype::F32
                } else {
                    Dtype::Bf16
                },
                0.0,
            )?;
            mark!(self, "gate_up_gemm");
            let (ti, fi) = (t as i32, f as i32);
            // Eight values a thread: x along a row, y over the tokens.
            let silu_cfg = LaunchConfig {
                grid_dim: ((f / 8).div_ceil(256) as u32, t.min(65535) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            if self.f32_gate_up {
                launch!(gpu, silu_mul_f32, silu_cfg; act, gu, ti, fi)?;
            } else {
                launch!(gpu, silu_mul, silu_cfg; act, gu, ti, fi)?;
            }
            mark!(self, "silu");
            // x += act · w_down^T
            gpu.gemm(
                t,
                cfg.hidden_size,
                f,
                act,
                Dtype::Bf16,
                layer.w_down.ptr(),
                x,
                Dtype::F32,
                residual_beta,
            )?;
            mark!(self, "down_gemm");
            if let Some((comm, n)) = reduce_rows {
                comm.all_reduce_sum_f32(x, n, gpu.cu_stream())?;
                mark!(self, "all_reduce");
            }

            if let Some(sink) = sink.as_deref_mut() {
                // Copy this layer's K|V rows out, then hand the previous
                // layer's to the sink while this one's copy runs.
                let n = t * 2 * kv_dim;
                let slot = li % 2;
                let host: &mut [f32] = self.host_kv[slot].as_mut_slice(n);
                gpu.copy_from(ws.kv_out.ptr(), host)?;
                let event = gpu.stream.record_event(None).map_err(CudaError::from)?;
                if let Some((prev, ev)) = pending.take() {
                    ev.synchronize().map_err(CudaError::from)?;
                    deliver(&self.host_kv[prev % 2], prev, plan, kv_dim, sink);
                }
                pending = Some((li, event));
            }
        }
        if let (Some(sink), Some((prev, ev))) = (sink, pending.take()) {
            ev.synchronize().map_err(CudaError::from)?;
            deliver(&self.host_kv[prev % 2], prev, plan, kv_dim, sink);
        }

        if let (true, Some(mi)) = (head_rows > 0, self.gemv_for(head_rows)) {
            // Final norm of the gathered rows and the output head in one kernel.
            let (logits, vocab, zero) = (ws.logits.ptr(), cfg.vocab_size as i32, 0i32);
            launch_fn!(gpu, pdl, gpu.kernels.gemv_out[mi], gemv_cfg(head_rows, cfg.vocab_size.div_ceil(2), cfg.hidden_size);
                logits, self.weights.output().ptr(), null, x, self.weights.final_norm.ptr(),
                logit_rows_p, eps, h, vocab, zero)?;
            self.launch_sampler(head_rows, at(layout.sampling()))?;
            mark!(self, "output_head");
        } else if head_rows > 0 {
            let normed = ws.normed.ptr();
            launch!(gpu, rms_norm, rows_cfg(head_rows, norm_threads); normed, x, self.weights.final_norm.ptr(), logit_rows_p, h, eps)?;
            let logits = ws.logits.ptr();
            gpu.gemm(
                head_rows,
                cfg.vocab_size,
                cfg.hidden_size,
                normed,
                Dtype::Bf16,
                self.weights.output().ptr(),
                logits,
                Dtype::F32,
                0.0,
            )?;
            self.launch_sampler(head_rows, at(layout.sampling()))?;
            mark!(self, "output_head");
        }
        Ok(())
    }

    /// Which fused-projection kernels a step of `tokens` rows runs, if any:
    /// when they are on, compiled for that many rows, the widths are whole
    /// 16-byte vectors and the rows fit in shared memory.
    fn gemv_for(&self, tokens: usize) -> Option<usize> {
        let cfg = &self.cfg;
        let q_dim = cfg.num_heads * cfg.head_dim;
        let widest = cfg.hidden_size.max(q_dim).max(cfg.intermediate_size);
        let fits = [cfg.hidden_size, q_dim, cfg.intermediate_size]
            .iter()
            .all(|w| w % 8 == 0)
            && tokens * widest * 2 <= MAX_ATTENTION_SMEM as usize;
        if self.fused_gemv && fits {
            gemv_index(tokens)
        } else {
            None
        }
    }

    /// Allocates the pinned staging of streamed KV the first time a step
    /// streams it.
    fn prepare_sink(&mut self, streaming: bool) -> Result<(), BackendError> {
        if streaming && self.host_kv.is_empty() {
            let bytes =
                self.opts.max_batch_tokens * 2 * self.cfg.num_kv_heads * self.cfg.head_dim * 4;
            self.gpu.bind()?;
            self.host_kv = vec![alloc_pinned(bytes)?, alloc_pinned(bytes)?];
        }
        Ok(())
    }

    /// Uploads a block table for the KV import/export kernels.
    fn table_for(
        &self,
        block_ids: &[u32],
        num_positions: usize,
    ) -> Result<DeviceBuffer, BackendError> {
        let pool = self.pool()?;
        let needed = num_positions.div_ceil(pool.block_size);
        if block_ids.len() < needed {
            return Err(BackendError::BlockTableTooShort {
                blocks: block_ids.len(),
                tokens: num_positions,
                block_size: pool.block_size,
            });
        }
        if let Some(&b) = block_ids[..needed]
            .iter()
            .find(|&&b| b as usize >= pool.num_blocks)
        {
            return Err(BackendError::BlockOutOfRange {
                block: b,
                num_blocks: pool.num_blocks,
            });
        }
        Ok(self.gpu.upload(&block_ids[..needed])?)
    }
}

/// KV bytes of `dtype` as the pool's bf16: as they are, or f32 rounded.
fn as_bf16(dtype: KvDtype, bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, BackendError> {
    match dtype {
        KvDtype::Bf16 => Ok(std::borrow::Cow::Borrowed(bytes)),
        KvDtype::F32 => {
            let values = KvDtype::F32
                .decode(bytes)
                .ok_or_else(|| BackendError::KvShapeMismatch("partial f32 values".into()))?;
            Ok(std::borrow::Cow::Owned(
                KvDtype::Bf16.encode(&values).to_vec(),
            ))
        }
    }
}

/// Hands one layer's K and V rows (staged as `[rows, K | V]`) to the sink,
/// per sequence.
fn deliver(
    staged: &PinnedBuffer,
    layer: usize,
    plan: &StepPlan,
    kv_dim: usize,
    sink: &mut dyn KvLayerSink,
) {
    let rows: &[f32] = staged.as_slice(plan.tokens * 2 * kv_dim);
    for (si, &(start, n)) in plan.seq_rows.iter().enumerate() {
        // The sink splits K from V itself, in the same pass as it encodes.
        let seq_rows = &rows[start * 2 * kv_dim..(start + n) * 2 * kv_dim];
        sink.layer_rows_computed(layer, si, seq_rows, kv_dim);
    }
}

/// A switch read from the environment: `1`/`on`/`true` or `0`/`off`/`false`,
/// else `default` (`TANDEM_CUDA_FUSED_GEMV`, `TANDEM_CUDA_PDL`: for comparing
/// the paths on a GPU machine without rebuilding).
fn env_switch(name: &str, default: bool) -> bool {
    match std::env::var(name).as_deref() {
        Ok("1") | Ok("on") | Ok("true") => true,
        Ok("0") | Ok("off") | Ok("false") => false,
        _ => default,
    }
}

/// Blocks of a fused projection an SM holds at once when kernels launch
/// early: as many as the grid has per SM (at most two per SM, see
/// `gemv_cfg`). 8B batch-1 decode on H200, same call: 4.90 ms without early
/// launch, 6.59 with it and no limit, 4.82 with it and this limit (with the
/// first weights loaded before staging); SmolLM2-135M 0.575 vs 0.549 ms.
const GEMV_RESIDENT: usize = 2;

/// Dynamic shared memory (bytes) that lets at most `blocks` blocks share an
/// SM of `smem_per_sm` bytes (each block also costs the 1 KiB the driver
/// reserves for it). With early launch, the next kernel's blocks take SMs as
/// the running kernel's leave them, and an SM that empties first can take
/// more of them than the others hold; a projection whose blocks are
/// unevenly spread over the SMs streams its weights more slowly.
fn gemv_smem_floor(smem_per_sm: u32, blocks: usize) -> u32 {
    let share = smem_per_sm / (blocks as u32 + 1);
    // (blocks + 1) blocks of `share - 1024 + 16` (+ the reserved 1 KiB)
    // overflow the SM; `blocks` of them fit.
    (share + 16).saturating_sub(1024).min(MAX_ATTENTION_SMEM)
}

/// Whether multi-token steps keep the gate/up products in f32 up to SiLU·mul
/// (on unless `TANDEM_CUDA_F32_GATE_UP=0`). Rounding them to bf16 (the GEMM
/// writing bf16) was the largest single share of the default model's logits
/// error: 2.28e-2 vs f32 for the design computed on the CPU, 1.53e-2 without
/// it; it costs about 1 ms of an 8B 4k-token prefill (H100) and twice the
/// gate/up workspace.
fn f32_gate_up_switch() -> bool {
    env_switch("TANDEM_CUDA_F32_GATE_UP", true)
}

/// The batch size a decode step of `seqs` sequences is padded to: powers of
/// two up to the planned maximum, so a handful of graphs serve every size.
fn graph_bucket(seqs: usize, max_seqs: usize) -> usize {
    seqs.next_power_of_two().min(max_seqs)
}

/// Whether prefill attention runs on tensor cores (head_dim 64 or 128).
fn tensor_core_prefill(cfg: &ModelConfig) -> bool {
    matches!(cfg.head_dim, 64 | 128)
}

/// The prefill-attention kernel of multi-token steps (llama.cu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrefillKernel {
    /// `prefill_attention_wg*` (Hopper, wgmma): a block of two warpgroups
    /// takes 64 query rows of two query heads sharing a KV head.
    Wgmma,
    /// `prefill_attention_tc*` (mma.sync): a block takes the `group` query
    /// heads of one KV head, 16 rows a warp, at most 8 warps.
    TensorCore,
    /// `prefill_attention`: scalar f32, any head dim, 16 rows of one head.
    Scalar,
}

/// The prefill kernel for `cfg`: wgmma where the GPU has it (`sm_90a`), the
/// head dim is 64 or 128 and the GQA group is even (two heads a block),
/// unless `TANDEM_CUDA_WGMMA=0`; else mma.sync for head dims 64 and 128; else
/// the scalar kernel.
fn prefill_kernel(cfg: &ModelConfig, wgmma_compiled: bool) -> PrefillKernel {
    let group = cfg.num_heads / cfg.num_kv_heads.max(1);
    if !tensor_core_prefill(cfg) {
        PrefillKernel::Scalar
    } else if wgmma_compiled && group.is_multiple_of(2) && env_switch("TANDEM_CUDA_WGMMA", true) {
        PrefillKernel::Wgmma
    } else {
        PrefillKernel::TensorCore
    }
}

/// Query rows per prefill-attention tile.
fn prefill_tile(cfg: &ModelConfig, kernel: PrefillKernel) -> usize {
    match kernel {
        PrefillKernel::Wgmma => 64,
        PrefillKernel::TensorCore => 16 * (8 / (cfg.num_heads / cfg.num_kv_heads)).max(1),
        PrefillKernel::Scalar => PREFILL_TILE,
    }
}

/// Threads of a prefill-attention block and its blocks per query tile (the
/// grid's y axis; x for the wgmma kernel, whose tiles run along y).
fn prefill_block(cfg: &ModelConfig, kernel: PrefillKernel) -> (u32, usize) {
    let group = cfg.num_heads / cfg.num_kv_heads;
    match kernel {
        PrefillKernel::Wgmma => (256, cfg.num_heads / 2),
        PrefillKernel::TensorCore => (
            (2 * group * prefill_tile(cfg, kernel)) as u32,
            cfg.num_kv_heads,
        ),
        PrefillKernel::Scalar => (PREFILL_THREADS, cfg.num_heads),
    }
}

/// Dynamic shared memory of the prefill-attention kernel (the layouts in
/// llama.cu).
fn prefill_smem(cfg: &ModelConfig, kernel: PrefillKernel) -> usize {
    let hd = cfg.head_dim;
    match kernel {
        // K and V tiles of 64 keys, double-buffered, and 64 query rows for
        // each of the two warpgroups, all bf16 without padding; then the two
        // stages' barriers and counters.
        PrefillKernel::Wgmma => (2 * 2 * 64 + 2 * 64) * hd * 2 + 32,
        // K and V tiles of 64 keys, double-buffered, bf16 rows padded by 8,
        // and 16 query rows per warp (group * tile / 16 warps), padded alike.
        PrefillKernel::TensorCore => {
            let warps = (cfg.num_heads / cfg.num_kv_heads) * prefill_tile(cfg, kernel) / 16;
            2 * 2 * 64 * (hd + 8) * 2 + warps * 16 * (hd + 8) * 2
        }
        PrefillKernel::Scalar => {
            4 * (PREFILL_TILE * hd + PREFILL_KEYS * (2 * hd + 1) + PREFILL_TILE * PREFILL_KEYS)
        }
    }
}

fn check_geometry(cfg: &ModelConfig) -> Result<(), CudaError> {
    let group = cfg.num_heads / cfg.num_kv_heads.max(1);
    if cfg.num_kv_heads == 0
        || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
        || group > 8
        || !cfg.head_dim.is_multiple_of(32)
        || cfg.head_dim > 256
        || !cfg.intermediate_size.is_multiple_of(8)
    {
        return Err(CudaError::Unsupported(format!(
            "attention geometry {} heads / {} kv heads / head_dim {} with intermediate {}: \
             the kernels need head_dim a multiple of 32 up to 256, at most 8 query heads \
             per KV head and an intermediate size divisible by 8",
            cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
        )));
    }
    // The wgmma kernel needs less than the mma.sync one it replaces.
    let smem = prefill_smem(cfg, prefill_kernel(cfg, false));
    if smem > MAX_ATTENTION_SMEM as usize {
        return Err(CudaError::Unsupported(format!(
            "head_dim {} needs {smem} bytes of shared memory",
            cfg.head_dim
        )));
    }
    Ok(())
}

impl ComputeBackend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.cfg.kv_bytes_per_token(2)
    }

    fn kv_dtype(&self) -> KvDtype {
        KvDtype::Bf16
    }

    fn kv_cache_budget_bytes(&self) -> Option<usize> {
        Some(self.kv_budget)
    }

    fn init_kv_cache(&mut self, block_size: usize, num_blocks: usize) -> Result<(), BackendError> {
        if block_size == 0 || num_blocks == 0 {
            return Err(BackendError::KvGeometry(format!(
                "block_size ({block_size}) and num_blocks ({num_blocks}) must be positive"
            )));
        }
        self.gpu.bind()?;
        self.gpu.synchronize()?;
        // Graphs point into the old pool.
        self.graphs.clear();
        self.kv = None;
        let bytes = self.cfg.kv_bytes_per_token(2) * block_size * num_blocks;
        let data = alloc(bytes)?;
        self.gpu.zero(&data)?;
        let slots = block_size * num_blocks;
        let rows = 2 * self.cfg.num_layers * slots;
        let row_elems = self.cfg.num_kv_heads * self.cfg.head_dim;
        // The kernel addresses rows with i32 coordinates.
        let tma = match kv_box_rows(block_size) {
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
            max_tiles: max_tiles(&self.opts),
            max_blocks: self.opts.max_model_len.div_ceil(block_size),
        };
        let inputs = alloc(layout.len() * 4)?;
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

    fn forward(
        &mut self,
        batch: &[SeqInput<'_>],
        logits: &mut Vec<f32>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        self.prepare_sink(sink.is_some())?;
        self.step(batch, StepOutput::Logits(logits), sink)
    }

    fn kv_pool_export(&self) -> Result<Option<ipc::KvPoolExport>, BackendError> {
        let pool = self.pool()?;
        Ok(Some(ipc::export_pool(
            &self.gpu,
            pool.data.ptr(),
            self.ipc_layout(pool),
        )?))
    }

    fn open_peer_kv(&mut self, pool: &ipc::KvPoolExport) -> Result<(), BackendError> {
        let local = self.ipc_layout(self.pool()?);
        self.init_peer_writer()?;
        let writer = self.peer_writer.as_mut().expect("initialised");
        writer.open(&self.gpu, &local, pool)?;
        Ok(())
    }

    fn write_kv_to_peer(
        &mut self,
        block_ids: &[u32],
        num_tokens: usize,
        target: &ipc::PeerKvTarget,
    ) -> Result<ipc::PeerWrite, BackendError> {
        let pool = self.pool()?;
        let (base, local) = (pool.data.ptr(), self.ipc_layout(pool));
        self.init_peer_writer()?;
        let writer = self.peer_writer.as_mut().expect("initialised");
        Ok(writer.write(&self.gpu, base, &local, block_ids, num_tokens, target)?)
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn graphs_captured(&self) -> usize {
        self.captured_graphs()
    }

    fn forward_sampled(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.prepare_sink(sink.is_some())?;
        let mut out = Vec::new();
        self.step(batch, StepOutput::Sampled(Some(sampling), &mut out), sink)?;
        Ok(out)
    }

    fn read_kv(&self, block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError> {
        let kv = self.read_kv_pieces(block_ids, num_tokens)?;
        Ok(kv.to_export())
    }

    fn read_kv_pieces(
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
            // The pool's bf16 bytes as they are: gathered on the device,
            // copied once to the host, no conversion on either side.
            let k_out = alloc(layer_bytes)?;
            let v_out = alloc(layer_bytes)?;
            for layer in 0..self.cfg.num_layers {
                let (kc, vc) = self.layer_cache(pool, layer);
                let (n, w, bs) = (num_tokens as i32, kv_dim as i32, pool.block_size as i32);
                let launch = LaunchConfig {
                    grid_dim: (num_tokens as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                launch!(self.gpu, kv_gather, launch; k_out.ptr(), v_out.ptr(), kc, vc, table.ptr(), n, w, bs)?;
                let mut k = vec![0u8; layer_bytes];
                let mut v = vec![0u8; layer_bytes];
                self.gpu.copy_from(k_out.ptr(), &mut k)?;
                self.gpu.copy_from(v_out.ptr(), &mut v)?;
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

    fn write_kv_layer(
        &mut self,
        block_ids: &[u32],
        start_pos: usize,
        layer: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), BackendError> {
        let w = check_kv_layer(&self.cfg, layer, k, v)?;
        let piece = KvLayerChunk {
            layer,
            start_pos,
            num_tokens: k.len() / w,
            k: KvDtype::Bf16.encode(k),
            v: KvDtype::Bf16.encode(v),
        };
        self.write_kv_piece(block_ids, KvDtype::Bf16, &piece)
    }

    fn write_kv_piece(
        &mut self,
        block_ids: &[u32],
        dtype: KvDtype,
        piece: &KvLayerChunk,
    ) -> Result<(), BackendError> {
        let pieces = KvPieces {
            dtype,
            num_layers: self.cfg.num_layers,
            num_tokens: piece.start_pos + piece.num_tokens,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            pieces: vec![piece.clone()],
        };
        self.write_kv_pieces(block_ids, &pieces)
    }

    fn write_kv_pieces(&mut self, block_ids: &[u32], kv: &KvPieces) -> Result<(), BackendError> {
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
        let k_in = alloc(most * kv_dim * 2)?;
        let v_in = alloc(most * kv_dim * 2)?;
        let pool = self.pool()?;
        for p in kv.pieces.iter().filter(|p| p.num_tokens > 0) {
            let (kc, vc) = self.layer_cache(pool, p.layer);
            let (k, v) = (as_bf16(kv.dtype, &p.k)?, as_bf16(kv.dtype, &p.v)?);
            self.gpu.copy_to(&k_in, 0, &k[..])?;
            self.gpu.copy_to(&v_in, 0, &v[..])?;
            let (sp, wi, bs) = (p.start_pos as i32, kv_dim as i32, pool.block_size as i32);
            let launch = LaunchConfig {
                grid_dim: (p.num_tokens as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            launch!(self.gpu, kv_scatter, launch; kc, vc, k_in.ptr(), v_in.ptr(), table.ptr(), sp, wi, bs)?;
            // The host bytes must outlive the copies and the staging is
            // reused by the next piece: wait for this one.
            self.gpu.synchronize()?;
        }
        Ok(())
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        self.gpu.bind()?;
        let pool = self.pool()?;
        check_blocks_in_pool(&[src, dst], pool.num_blocks)?;
        let bytes = pool.block_size * self.cfg.num_kv_heads * self.cfg.head_dim * 2;
        for layer in 0..self.cfg.num_layers {
            let (kc, vc) = self.layer_cache(pool, layer);
            for base in [kc, vc] {
                self.gpu.copy_device(
                    base + (dst as usize * bytes) as u64,
                    base + (src as usize * bytes) as u64,
                    bytes,
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses_cpu_cuda_and_ordinals_and_names_bad_input() {
        assert_eq!("cpu".parse::<DeviceSpec>(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(3)));
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA"] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err.contains(bad) && err.contains("cuda:N"), "{err}");
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!(
            DeviceSpec::Cuda(2).to_string().parse::<DeviceSpec>(),
            Ok(DeviceSpec::Cuda(2))
        );
    }

    /// Without a CUDA driver (CI, laptops) asking for the GPU is a clear error
    /// naming the library, not a panic; with one, a device that does not exist
    /// is named.
    #[test]
    fn a_missing_driver_or_device_is_a_clear_error() {
        let cfg = tandem_model::dummy::config("smollm2-135m").unwrap();
        let err = match CudaBackend::new_dummy(999, cfg, 1, CudaOptions::default()) {
            Ok(_) => panic!("cuda:999 does not exist"),
            Err(e) => e.to_string(),
        };
        // SAFETY: only tries to dlopen the library.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            assert!(err.contains("cuda:999"), "{err}");
        } else {
            assert!(
                err.starts_with("no CUDA driver found (libcuda.so)"),
                "{err}"
            );
        }
    }

    /// H100/H200: 228 KiB an SM.
    #[test]
    fn gemv_smem_floor_admits_exactly_the_asked_blocks() {
        let sm = 233_472u32;
        for blocks in 1..=4u32 {
            let floor = gemv_smem_floor(sm, blocks as usize);
            let per_block = floor + 1024;
            assert!(blocks * per_block <= sm, "{blocks} blocks fit");
            assert!(
                (blocks + 1) * per_block > sm,
                "{} blocks do not",
                blocks + 1
            );
        }
    }

    #[test]
    fn graph_buckets_are_powers_of_two_capped_at_the_planned_maximum() {
        assert_eq!(graph_bucket(1, 64), 1);
        assert_eq!(graph_bucket(3, 64), 4);
        assert_eq!(graph_bucket(33, 64), 64);
        assert_eq!(graph_bucket(40, 48), 48);
    }

    /// A long run of decode steps (contexts from 1 to the planned maximum,
    /// batches that grow and shrink) meets one graph per batch bucket and
    /// no more, whatever the contexts: no capture in the middle of serving
    /// once each bucket has been seen.
    #[test]
    fn decode_graphs_are_keyed_by_the_batch_bucket_alone() {
        let opts = CudaOptions {
            max_num_seqs: 64,
            max_model_len: 8192,
            ..CudaOptions::default()
        };
        for shape in ["llama3-8b", "smollm2-135m", "qwen2-7b"] {
            let cfg = tandem_model::dummy::config(shape).unwrap();
            let mut keys = std::collections::HashSet::new();
            let mut buckets = std::collections::HashSet::new();
            for ctx in (1..=opts.max_model_len).step_by(61) {
                let seqs = 1 + (ctx * 7) % opts.max_num_seqs;
                keys.insert(decode_graph_key(&cfg, &opts, 132, seqs, opts.max_num_seqs));
                buckets.insert(graph_bucket(seqs, opts.max_num_seqs));
            }
            assert_eq!(keys.len(), buckets.len(), "{shape}: {keys:?}");
            assert_eq!(buckets.len(), 7, "{shape}: buckets 1, 2, 4, ..., 64");
        }
    }

    /// Decode attention's grid fills one wave of the SMs at long contexts
    /// for every batch size (or runs one split a sequence), never asks for
    /// more splits than the longest context can use, and its partial results
    /// fit the buffers planned for them.
    #[test]
    fn decode_splits_fill_the_gpu_and_fit_the_partial_buffers() {
        let num_sms = 132;
        for (shape, max_model_len) in [("llama3-8b", 8192), ("smollm2-135m", 4096)] {
            let cfg = tandem_model::dummy::config(shape).unwrap();
            let opts = CudaOptions {
                max_num_seqs: 96,
                max_model_len,
                ..CudaOptions::default()
            };
            let rows = decode_part_rows(&cfg, &opts, num_sms);
            for seqs in 1..=opts.max_num_seqs {
                let splits = decode_splits(&cfg, &opts, num_sms, seqs);
                assert!(splits >= 1 && splits <= max_model_len / DECODE_MIN_CHUNK);
                let per_split = seqs * cfg.num_kv_heads;
                let blocks = per_split * splits;
                let sms = num_sms as usize;
                assert!(
                    (blocks <= sms || splits == 1)
                        && (blocks + per_split > sms || splits == max_model_len / DECODE_MIN_CHUNK),
                    "{shape}: {seqs} sequences get {splits} splits, {blocks} blocks"
                );
                assert!(seqs * cfg.num_heads * splits <= rows);
            }
            // The largest batch runs one split a sequence: short steps.
            assert_eq!(decode_splits(&cfg, &opts, num_sms, 96), 1, "{shape}");
        }
        // Head dims the new kernel does not cover keep the older kernel's
        // splits: every one the longest context needs.
        let mut cfg = tandem_model::dummy::config("smollm2-135m").unwrap();
        cfg.head_dim = 96;
        let opts = CudaOptions::default();
        assert_eq!(decode_splits(&cfg, &opts, num_sms, 5), max_splits(&opts));
        assert_eq!(decode_splits(&cfg, &opts, num_sms, 5), 64);
    }

    #[test]
    fn input_sections_do_not_overlap() {
        let l = InputLayout {
            max_tokens: 100,
            max_seqs: 7,
            max_tiles: 13,
            max_blocks: 5,
        };
        let starts = [
            (l.tokens(), l.max_tokens),
            (l.positions(), l.max_tokens),
            (l.slots(), l.max_tokens),
            (l.logit_rows(), l.max_seqs),
            (l.tile_seq(), l.max_tiles),
            (l.tile_row0(), l.max_tiles),
            (l.tile_rows(), l.max_tiles),
            (l.sampling(), SAMPLING_WORDS * l.max_seqs),
            (l.block_tables(), l.max_seqs * l.max_blocks),
        ];
        for w in starts.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
        assert_eq!(l.len(), l.block_tables() + 35);
    }

    #[test]
    fn kv_tma_boxes_are_whole_swizzle_atoms_that_tile_64_keys() {
        // One page a box up to 64 keys, 64 keys of a page beyond.
        assert_eq!(kv_box_rows(16), Some(16));
        assert_eq!(kv_box_rows(8), Some(8));
        assert_eq!(kv_box_rows(32), Some(32));
        assert_eq!(kv_box_rows(64), Some(64));
        assert_eq!(kv_box_rows(256), Some(64));
        // Pages of 4 rows would split the 8-row swizzle atom; 48 or 96 keys
        // don't tile 64; these pools run the mma.sync kernel.
        assert_eq!(kv_box_rows(4), None);
        assert_eq!(kv_box_rows(48), None);
        assert_eq!(kv_box_rows(96), None);
        assert_eq!(kv_box_rows(0), None);
    }

    #[test]
    fn prefill_kernel_follows_head_dim_group_and_architecture() {
        let llama = tandem_model::dummy::config("llama3-8b").unwrap(); // 32/8 heads, 128
        let smol = tandem_model::dummy::config("smollm2-135m").unwrap(); // 9/3 heads, 64
        assert_eq!(prefill_kernel(&llama, true), PrefillKernel::Wgmma);
        assert_eq!(prefill_kernel(&llama, false), PrefillKernel::TensorCore);
        // Two heads a block: an odd group keeps the mma.sync kernel.
        assert_eq!(prefill_kernel(&smol, true), PrefillKernel::TensorCore);
        let mut odd = llama.clone();
        odd.head_dim = 96;
        assert_eq!(prefill_kernel(&odd, true), PrefillKernel::Scalar);

        // The wgmma grid: 64-row tiles, one block per pair of query heads,
        // both of the same KV head, in less shared memory than mma.sync's.
        assert_eq!(prefill_tile(&llama, PrefillKernel::Wgmma), 64);
        assert_eq!(prefill_block(&llama, PrefillKernel::Wgmma), (256, 16));
        assert_eq!(prefill_block(&llama, PrefillKernel::TensorCore), (256, 8));
        assert_eq!(prefill_smem(&llama, PrefillKernel::Wgmma), 96 * 1024 + 32);
        assert!(
            prefill_smem(&llama, PrefillKernel::Wgmma)
                < prefill_smem(&llama, PrefillKernel::TensorCore)
        );
        // Two blocks fit an SM (228 KiB on Hopper), as WG_MIN_BLOCKS asks.
        assert!(2 * prefill_smem(&llama, PrefillKernel::Wgmma) <= 227 * 1024);
        // Every tiling fits the planned tile count (made for 16-row tiles).
        for kernel in [
            PrefillKernel::Wgmma,
            PrefillKernel::TensorCore,
            PrefillKernel::Scalar,
        ] {
            assert!(prefill_tile(&llama, kernel) >= PREFILL_TILE);
        }
    }

    #[test]
    fn unsupported_geometries_are_refused_with_the_reason() {
        let mut cfg = tandem_model::testing::tiny_config(tandem_model::Architecture::Llama);
        cfg.head_dim = 48;
        let err = check_geometry(&cfg).unwrap_err().to_string();
        assert!(err.contains("head_dim 48"), "{err}");
    }
}
