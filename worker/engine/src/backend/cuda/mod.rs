//! The CUDA backend: the engine's forward steps on an NVIDIA GPU.
//!
//! Weights and the paged KV cache are bf16 on the device; arithmetic is f32
//! (cuBLAS GEMMs with f32 accumulation, f32 kernels), and the residual stream
//! stays f32. Kernels are CUDA C (`worker/engine/kernels/`, one file per
//! kernel family) compiled by NVRTC at start for the device's architecture.
//! The residual adds are fused into the output and down projections (GEMMs
//! with `beta = 1` into the f32 residual), RoPE into the KV-cache write, the
//! last-token gather into the final RMSNorm. Decode attention is
//! flash-decoding over the paged cache (GQA-aware, split over the context);
//! prefill attention is causal, flash-style, over the paged cache, so chunked
//! prefill and prefix-cache hits need no special path.
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
//! The parts: [`tuning`] (the `TANDEM_CUDA_*` switches and the kernels'
//! constants), `kernels` (the NVRTC program), `device` (context, buffers,
//! GEMM), `launch` (a typed launch per kernel), `plan` (a batch into step
//! inputs), `forward` (the forward pass: embed, attention, MLP, head), `kv`
//! (the KV pool, its import and export), [`ipc`] (cuda-ipc KV transfer),
//! [`tp`] (tensor parallelism over NCCL). The GPU checks and benchmarks are
//! beside this module, in [`super::cuda_harness`].
//!
//! cudarc loads the CUDA libraries at run time (`dynamic-loading`), so this
//! module builds and its host-side logic is tested on machines without CUDA;
//! opening a device there fails with an error naming the missing library.

mod device;
mod forward;
pub mod ipc;
mod kernels;
mod kv;
mod launch;
mod lt;
mod nccl;
mod plan;
pub mod tp;
pub mod tuning;
mod weights;

pub(crate) use device::check_gpus;
pub(crate) use kernels::GEMV_TOKENS;
pub use lt::GemmResult;
pub use tuning::{CudaTuning, KernelTuning};

use std::collections::HashMap;

use cudarc::driver::CudaGraph;

use super::{check_kv_layer, check_sampling_rows, BackendError, ComputeBackend, DeviceSampling};
use super::{KvLayerSink, SeqInput};
use device::{alloc_pinned, DeviceBuffer, Gpu, PinnedBuffer, MAX_ATTENTION_SMEM};
use forward::Workspace;
use kernels::gemv_index;
use kv::KvPool;
use launch::{PrefillKernel, SampleRows};
use plan::{check_geometry, decode_graph_key, decode_part_rows, prefill_kernel};
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

/// A decode graph, replayable while its pointers stay valid (until the KV
/// pool is reallocated).
struct DecodeGraph(CudaGraph);

// SAFETY: a graph is used only by the thread that owns the backend, one call
// at a time; CUDA allows using it from another thread with the context bound.
unsafe impl Send for DecodeGraph {}

/// What a step returns to the host.
enum StepOutput<'a> {
    Logits(&'a mut Vec<f32>),
    /// Token ids picked on the device, by these rules (one per sequence
    /// wanting logits; `None`: greedy), with the grammar masks `Masks` fills
    /// once the step is under way ([`ComputeBackend::forward_sampled_masked`]).
    Sampled(
        Option<&'a [DeviceSampling]>,
        Option<Masks<'a>>,
        &'a mut Vec<u32>,
    ),
}

/// Fills a step's allowed-token bitsets (rows of words, every bit set).
type MaskFill<'a> = dyn FnMut(&mut [u32], usize) + 'a;
type Masks<'a> = &'a mut MaskFill<'a>;

pub struct CudaBackend {
    cfg: ModelConfig,
    opts: CudaOptions,
    // Field order is drop order: graphs and buffers go before the context.
    graphs: HashMap<(usize, usize), DecodeGraph>,
    /// Key of the graph the last decode step replayed.
    last_graph: Option<(usize, usize)>,
    kv: Option<KvPool>,
    ws: Workspace,
    inv_freq: DeviceBuffer<f32>,
    host_logits: PinnedBuffer,
    host_kv: Vec<PinnedBuffer>,
    /// Page-locked staging of a step's grammar masks (`ws.token_masks`' size).
    host_masks: PinnedBuffer,
    /// The masks in sampled-row order, as the engine fills them.
    mask_rows: Vec<u32>,
    weights: DeviceWeights,
    kv_budget: usize,
    /// Per-operation GPU time, when profiling (eager steps only).
    profiler: Option<Profiler>,
    /// Writes prompts' KV into peers' pools (cuda-ipc), made on first use.
    peer_writer: Option<ipc::PeerWriter>,
    /// The switches this backend runs with: the environment's when it was
    /// created ([`CudaTuning::from_env`]); `set_fused_gemv`,
    /// `set_gemv_max_blocks` and `set_pdl` change theirs (`pdl` holds whether
    /// early launch is on, which it never is before compute capability 9.0).
    tuning: CudaTuning,
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
        let tuning = CudaTuning::from_env()?;
        let gpu = Gpu::open(ordinal, &tuning)?;
        let w = DeviceWeights::upload(&gpu, &cfg, weights)?;
        Self::assemble(gpu, cfg, w, opts, tuning)
    }

    /// Opens `cuda:ordinal` with random weights of `cfg`'s shape generated on
    /// the device from `seed` (`--load-format dummy`).
    pub fn new_dummy(
        ordinal: usize,
        cfg: ModelConfig,
        seed: u64,
        opts: CudaOptions,
    ) -> Result<Self, BackendError> {
        let tuning = CudaTuning::from_env()?;
        let gpu = Gpu::open(ordinal, &tuning)?;
        let w = DeviceWeights::random(&gpu, &cfg, seed)?;
        Self::assemble(gpu, cfg, w, opts, tuning)
    }

    fn assemble(
        gpu: Gpu,
        cfg: ModelConfig,
        weights: DeviceWeights,
        mut opts: CudaOptions,
        tuning: CudaTuning,
    ) -> Result<Self, BackendError> {
        check_geometry(&cfg, &gpu.tuning)?;
        if opts.max_num_seqs == 0 || opts.max_batch_tokens == 0 || opts.max_model_len == 0 {
            return Err(CudaError::Option(format!("{opts:?}: sizes must be positive")).into());
        }
        opts.max_batch_tokens = opts.max_batch_tokens.max(opts.max_num_seqs);
        let part_rows = decode_part_rows(&cfg, &opts, &gpu.tuning, gpu.num_sms);
        let ws = Workspace::alloc(&cfg, &opts, part_rows, tuning.f32_gate_up)?;
        gpu.zero(&ws.split_counters)?;
        let inv_freq = gpu.upload(&super::cpu::rope_inv_freq(&cfg))?;
        let host_logits = alloc_pinned(opts.max_num_seqs * cfg.vocab_size * 4)?;
        let host_masks = alloc_pinned(opts.max_num_seqs * cfg.vocab_size.div_ceil(32) * 4)?;
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
        let wgmma = gpu.kernels.prefill_attention_wg.is_some() && tuning.wgmma;
        let prefill = prefill_kernel(&cfg, wgmma);
        tracing::debug!(?prefill, "prefill attention kernel");
        let pdl = tuning.pdl;
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
            host_masks,
            mask_rows: Vec::new(),
            weights,
            kv_budget,
            profiler: None,
            peer_writer: None,
            // `pdl` set below by set_pdl, with the fused projections' carveout.
            tuning: CudaTuning {
                pdl: false,
                ..tuning
            },
            prefill_preferred: prefill,
            prefill,
            tp: None,
            gpu,
        };
        // Needs compute capability 9.0 or newer (set_pdl checks).
        backend.set_pdl(pdl)?;
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

    /// The switches this backend runs with (see the `tuning` field).
    pub fn tuning(&self) -> &CudaTuning {
        &self.tuning
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

    /// Whether multi-token steps run the tensor-core prefill attention (a
    /// bf16 query and K, V), which the CPU mirror of the kernels' rounding
    /// follows.
    pub(crate) fn tensor_core_prefill(&self) -> bool {
        plan::tensor_core_prefill(&self.cfg)
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
        self.step(batch, StepOutput::Sampled(None, None, &mut out), None)?;
        Ok(out)
    }

    /// Turns decode CUDA graphs on or off (for measuring what they save).
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.opts.cuda_graphs = on;
    }

    /// Turns the fused small-batch projections (steps of 1, 2 or 4 tokens)
    /// on or off; off, every projection is a cuBLAS GEMM (for comparing).
    pub fn set_fused_gemv(&mut self, on: bool) {
        if self.tuning.fused_gemv != on {
            // Captured graphs hold the other path's kernels.
            self.graphs.clear();
        }
        self.tuning.fused_gemv = on;
    }

    /// Caps the fused projections' grids at `blocks` blocks (`None`: two per
    /// SM). One block makes each warp loop over many row pairs, which small
    /// check models otherwise never do.
    pub fn set_gemv_max_blocks(&mut self, blocks: Option<usize>) {
        if self.tuning.gemv_max_blocks != blocks {
            self.graphs.clear();
        }
        self.tuning.gemv_max_blocks = blocks;
    }

    /// Whether decode kernels launch early (programmatic dependent launch).
    pub fn pdl(&self) -> bool {
        self.tuning.pdl
    }

    /// Turns programmatic dependent launches on or off (compute capability
    /// 9.0 and newer; off elsewhere): each decode kernel starts, and
    /// prefetches its weights, while the previous one finishes; off, kernels
    /// start one after the other. With them on, the fused projections are
    /// held to `gemv_resident` blocks an SM (`gemv_smem_floor`), which
    /// needs all of an SM's L1/shared memory given to shared memory.
    pub fn set_pdl(&mut self, on: bool) -> Result<(), BackendError> {
        let on = on && !self.gpu.arch.starts_with("sm_8");
        if self.tuning.pdl != on {
            self.graphs.clear();
        }
        self.tuning.pdl = on;
        // CU_SHAREDMEM_CARVEOUT_DEFAULT (-1) leaves the choice to the driver.
        let carveout = if self.gemv_floor() > 0 { 100 } else { -1 };
        for k in self.gpu.kernels.gemv() {
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
        match (self.tuning.pdl, self.tuning.gemv_resident) {
            (true, Some(n)) => gemv_smem_floor(self.gpu.smem_per_sm, n),
            _ => 0,
        }
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
        if self.tuning.fused_gemv && fits {
            gemv_index(tokens)
        } else {
            None
        }
    }

    /// The step sizes (tokens) that run the fused projections, whose MLP
    /// keeps gate and up in f32 (what the CPU mirror of the kernels'
    /// rounding follows).
    pub(crate) fn fused_gemv_tokens(&self) -> Vec<usize> {
        GEMV_TOKENS
            .iter()
            .copied()
            .filter(|&t| self.gemv_for(t).is_some())
            .collect()
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
        self.gpu.sample_rows(
            self.tuning.pdl,
            &SampleRows {
                next: self.ws.next_tokens.dev(),
                logits: self.ws.logits.dev(),
                params: params.dev(),
                masks: None,
                rows,
                vocab,
            },
        )?;
        let mut ids = vec![0i32; rows];
        self.gpu.copy_from(self.ws.next_tokens.dev(), &mut ids)?;
        self.gpu.synchronize()?;
        Ok(ids.into_iter().map(|i| i as u32).collect())
    }

    /// A step whose tokens are picked on the device, with grammar masks when
    /// given ([`ComputeBackend::forward_sampled_masked`]).
    fn sampled_step(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        masks: Option<&mut MaskFill<'_>>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.prepare_sink(sink.is_some())?;
        let mut out = Vec::new();
        let masks = masks.map(|m| m as &mut MaskFill<'_>);
        self.step(
            batch,
            StepOutput::Sampled(Some(sampling), masks, &mut out),
            sink,
        )?;
        Ok(out)
    }

    /// After a step's own sampling: fills the grammar masks of the sampled
    /// rows (`wanted[i]` is the head row of the i-th), stages them and
    /// samples the head rows again with them. Unconstrained rows get every
    /// bit and the same rule and uniform number, so they pick what they did.
    fn resample_masked(
        &mut self,
        wanted: &[usize],
        fill: &mut dyn FnMut(&mut [u32], usize),
    ) -> Result<(), BackendError> {
        let vocab = self.cfg.vocab_size;
        let words = vocab.div_ceil(32);
        let rows = wanted.last().map_or(0, |&r| r + 1);
        if rows == 0 {
            return Ok(());
        }
        self.mask_rows.clear();
        self.mask_rows.resize(wanted.len() * words, u32::MAX);
        fill(&mut self.mask_rows, words);
        let staged: &mut [u32] = self.host_masks.as_mut_slice(rows * words);
        staged.fill(u32::MAX);
        for (allowed, &r) in self.mask_rows.chunks(words).zip(wanted) {
            staged[r * words..(r + 1) * words].copy_from_slice(allowed);
        }
        let staged: &[u32] = self.host_masks.as_slice(rows * words);
        // Pinned source, and the step synchronises before the next fill.
        self.gpu.copy_to(&self.ws.token_masks, 0, staged)?;
        let pool = self.pool()?;
        let rules = pool.inputs.dev().offset(pool.layout.sampling());
        self.gpu.sample_rows(
            false,
            &SampleRows {
                next: self.ws.next_tokens.dev(),
                logits: self.ws.logits.dev(),
                params: rules,
                masks: Some(self.ws.token_masks.dev()),
                rows,
                vocab,
            },
        )?;
        Ok(())
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

    /// Plans a step, runs it (replaying or capturing its decode graph, or
    /// eagerly) and copies back what `out` asks for.
    fn step(
        &mut self,
        batch: &[SeqInput<'_>],
        out: StepOutput<'_>,
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        self.gpu.bind()?;
        let sampling = match &out {
            StepOutput::Sampled(rules, _, _) => *rules,
            StepOutput::Logits(_) => None,
        };
        if let Some(rules) = sampling {
            check_sampling_rows(batch, rules)?;
        }
        let (plan, bucket) = self.plan(batch, sink.is_none(), sampling)?;
        if plan.tokens == 0 {
            match out {
                StepOutput::Logits(l) => l.clear(),
                StepOutput::Sampled(_, _, t) => t.clear(),
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
                    &self.gpu.tuning,
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
                self.gpu.copy_from(self.ws.logits.dev(), host)?;
                self.gpu.synchronize()?;
                logits.clear();
                logits.reserve(wanted.len() * vocab);
                let host: &[f32] = self.host_logits.as_slice(n * vocab);
                for &r in &wanted {
                    logits.extend_from_slice(&host[r * vocab..(r + 1) * vocab]);
                }
            }
            StepOutput::Sampled(_, masks, tokens) => {
                if let Some(fill) = masks {
                    // The forward is under way: the masks are computed now,
                    // then the constrained rows are sampled again with them.
                    self.resample_masked(&wanted, fill)?;
                }
                // Into page-locked memory (the logits' buffer, unused here):
                // a copy to pageable memory is staged by the driver and costs
                // more than a step of a small model's kernels.
                let n = wanted.last().map_or(0, |&r| r + 1);
                let ids: &mut [i32] = self.host_logits.as_mut_slice(n);
                self.gpu.copy_from(self.ws.next_tokens.dev(), ids)?;
                self.gpu.synchronize()?;
                let ids: &[i32] = self.host_logits.as_slice(n);
                tokens.clear();
                tokens.extend(wanted.iter().map(|&r| ids[r] as u32));
            }
        }
        Ok(())
    }

    fn capture(
        &mut self,
        plan: &plan::StepPlan,
        head_rows: usize,
    ) -> Result<DecodeGraph, BackendError> {
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
}

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
        self.alloc_kv_pool(block_size, num_blocks)
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
        self.sampled_step(batch, sampling, None, sink)
    }

    fn forward_sampled_masked(
        &mut self,
        batch: &[SeqInput<'_>],
        sampling: &[DeviceSampling],
        masks: &mut dyn FnMut(&mut [u32], usize),
        sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<Vec<u32>, BackendError> {
        self.sampled_step(batch, sampling, Some(masks), sink)
    }

    fn read_kv(&self, block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError> {
        Ok(self.export_kv(block_ids, num_tokens)?.to_export())
    }

    fn read_kv_pieces(
        &self,
        block_ids: &[u32],
        num_tokens: usize,
    ) -> Result<KvPieces, BackendError> {
        self.export_kv(block_ids, num_tokens)
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
        self.import_kv(block_ids, &pieces)
    }

    fn write_kv_pieces(&mut self, block_ids: &[u32], kv: &KvPieces) -> Result<(), BackendError> {
        self.import_kv(block_ids, kv)
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        self.copy_kv_block(src, dst)
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
    fn kv_tma_boxes_are_whole_swizzle_atoms_that_tile_64_keys() {
        let wg_k = KernelTuning::default().wg_k;
        assert_eq!(wg_k, 64);
        let rows = |block_size| device::kv_box_rows(block_size, wg_k);
        // One page a box up to 64 keys, 64 keys of a page beyond.
        assert_eq!(rows(16), Some(16));
        assert_eq!(rows(8), Some(8));
        assert_eq!(rows(32), Some(32));
        assert_eq!(rows(64), Some(64));
        assert_eq!(rows(256), Some(64));
        // Pages of 4 rows would split the 8-row swizzle atom; 48 or 96 keys
        // don't tile 64; these pools run the mma.sync kernel.
        assert_eq!(rows(4), None);
        assert_eq!(rows(48), None);
        assert_eq!(rows(96), None);
        assert_eq!(rows(0), None);
    }
}
