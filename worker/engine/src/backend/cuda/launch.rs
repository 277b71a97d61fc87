//! Typed kernel launches: one method of [`Gpu`] per kernel of the program
//! (`worker/engine/kernels/`), taking its arguments by name and type (device
//! addresses as [`Dev<T>`] of the element type the kernel declares) and
//! computing the launch shape the kernel was written for. Only this file
//! lists a kernel's parameters in order.
//!
//! The wrappers trust their device addresses as [`Dev`] documents: each
//! addresses live memory of the extent the kernel indexes for that shape.

use std::ffi::c_void;

use cudarc::driver::{CudaFunction, LaunchConfig};
use tandem_model::ModelConfig;

use super::device::{bf16, Dev, Gpu, TmaMap};
use super::kernels::{decode_v2_index, gemv_index, DECODE_V2_GROUPS};
use super::tuning::KernelTuning;
use super::CudaError;

/// The Rust type of a kernel parameter of some C type: `int` is `i32`,
/// `float` `f32`, `unsigned long long` `u64`, `T*` [`Dev<T>`], and
/// `__grid_constant__ TmaMap` a [`TmaMap`] by value.
///
/// # Safety
/// An implementing type has the size and representation of the C type it
/// stands for.
unsafe trait KernelArg {}

// SAFETY: the same size and representation as int, float, unsigned long
// long, a pointer (a `#[repr(transparent)]` u64) and the 128-byte tensor map.
unsafe impl KernelArg for i32 {}
unsafe impl KernelArg for f32 {}
unsafe impl KernelArg for u64 {}
unsafe impl<T> KernelArg for Dev<T> {}
unsafe impl KernelArg for TmaMap {}

/// A pointer to one argument's value, as the driver's launch takes it.
fn arg<T: KernelArg>(value: &T) -> *mut c_void {
    value as *const T as *mut c_void
}

/// The argument list of a launch: a pointer to each value, in order.
macro_rules! args {
    ($($a:expr),* $(,)?) => {
        &mut [$(arg(&$a)),*]
    };
}

/// `sample_rows`' operands: `rows` rows of `logits` (`[rows, vocab]`)
/// sampled by the rules at `params` (`SAMPLING_WORDS` words a row) into
/// `next`. With `masks` (`[rows, vocab.div_ceil(32)]` allowed-token bitsets)
/// a row's forbidden logits are set to `-inf` first, in place.
pub(super) struct SampleRows {
    pub next: Dev<i32>,
    pub logits: Dev<f32>,
    pub params: Dev<i32>,
    pub masks: Option<Dev<u32>>,
    pub rows: usize,
    pub vocab: usize,
}

/// Attention head counts: the model's, or a tensor-parallel rank's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heads {
    /// Query heads.
    pub q: usize,
    /// KV heads.
    pub kv: usize,
    /// Head dimension.
    pub dim: usize,
}

impl Heads {
    pub fn of(cfg: &ModelConfig) -> Self {
        Self {
            q: cfg.num_heads,
            kv: cfg.num_kv_heads,
            dim: cfg.head_dim,
        }
    }

    /// Query heads sharing one KV head.
    pub fn group(&self) -> usize {
        self.q / self.kv
    }

    pub fn q_dim(&self) -> usize {
        self.q * self.dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv * self.dim
    }

    /// (nh, nkv, hd) as the kernels take them.
    fn ints(&self) -> (i32, i32, i32) {
        (self.q as i32, self.kv as i32, self.dim as i32)
    }
}

/// One layer's paged KV cache and the step's block tables.
#[derive(Clone, Copy)]
pub(super) struct PagedKv {
    pub k_cache: Dev<bf16>,
    pub v_cache: Dev<bf16>,
    /// `[seqs, max_blocks]` physical block ids.
    pub block_tables: Dev<i32>,
    pub block_size: usize,
    /// Block-table entries per sequence.
    pub max_blocks: usize,
}

/// Partial results of decode attention's splits and the per-(sequence, KV
/// head) counters of finished splits (zero between steps).
#[derive(Clone, Copy)]
pub(super) struct SplitScratch {
    pub part_max: Dev<f32>,
    pub part_sum: Dev<f32>,
    pub part_out: Dev<f32>,
    pub counters: Dev<i32>,
}

/// Grid of one block per row.
fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A grid-stride launch covering the whole device.
fn grid_stride(num_sms: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (num_sms * 8, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `rms_norm`: `out[r] = bf16(x[src] / rms(x[src]) * weight)` for `rows`
/// rows, `src = gather[r]` (or `r`).
pub(super) struct RmsNorm {
    pub out: Dev<bf16>,
    pub x: Dev<f32>,
    pub weight: Dev<f32>,
    /// Source row of each output row (the last token of each sequence,
    /// before the output head); `None`: row `r` itself.
    pub gather: Option<Dev<i32>>,
    pub rows: usize,
    pub hidden: usize,
    pub eps: f32,
}

/// `rope_kv_write`: per token, the QKV bias added, Q and K rotated by the
/// step's RoPE table, K and V written to the cache.
pub(super) struct RopeKvWrite {
    /// `[rows, q_dim + 2 * kv_dim]` f32, the QKV GEMM's output; Q is
    /// rotated in place unless `q_out` is given.
    pub qkv: Dev<f32>,
    pub bias: Option<Dev<f32>>,
    /// The step's (cos, sin) per token and frequency ([`Gpu::rope_table`]).
    pub rope_cs: Dev<[f32; 2]>,
    /// Cache slot of each token (negative: padding, not written).
    pub slots: Dev<i32>,
    pub k_cache: Dev<bf16>,
    pub v_cache: Dev<bf16>,
    /// K and V as stored (bf16-rounded, f32), `[rows, K | V]`, for
    /// streaming them to the host.
    pub kv_out: Option<Dev<f32>>,
    /// The rotated Q scaled by `q_scale` as bf16 (what the wgmma prefill
    /// attention reads) instead of in place.
    pub q_out: Option<Dev<bf16>>,
    pub q_scale: f32,
    pub heads: Heads,
    pub rows: usize,
}

/// Gate/up products of the unfused MLP, `[tokens, 2 * f]` (gate, then up).
#[derive(Clone, Copy)]
pub(super) enum GateUp {
    Bf16(Dev<bf16>),
    F32(Dev<f32>),
}

/// Decode attention of one layer: one query row per sequence.
pub(super) struct DecodeAttention {
    /// `[seqs, q_dim + 2 * kv_dim]`: each sequence's query (rotated).
    pub qkv: Dev<f32>,
    pub kv: PagedKv,
    /// Each sequence's newest position (its context is one more).
    pub positions: Dev<i32>,
    pub scratch: SplitScratch,
    /// `[seqs, q_dim]` bf16.
    pub out: Dev<bf16>,
    pub heads: Heads,
    pub seqs: usize,
    /// The grid's splits ([`super::plan::decode_splits`]).
    pub splits: usize,
    pub scale: f32,
}

/// The prefill-attention kernel of multi-token steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum PrefillKernel {
    /// `prefill_attention_wg*` (Hopper, wgmma): a block of two warpgroups
    /// takes 64 query rows of two query heads sharing a KV head.
    Wgmma,
    /// `prefill_attention_tc*` (mma.sync): a block takes the `group` query
    /// heads of one KV head, 16 rows a warp, at most `TC_WARPS` warps.
    TensorCore,
    /// `prefill_attention`: scalar f32, any head dim, `PF_Q` rows of one head.
    Scalar,
}

impl PrefillKernel {
    /// Query rows per tile.
    pub fn tile(self, heads: Heads, t: &KernelTuning) -> usize {
        match self {
            PrefillKernel::Wgmma => 64,
            PrefillKernel::TensorCore => 16 * (t.tc_warps / heads.group()).max(1),
            PrefillKernel::Scalar => t.pf_q,
        }
    }

    /// Threads of a block and its blocks per query tile (the grid's y axis;
    /// x for the wgmma kernel, whose tiles run along y).
    pub fn block(self, heads: Heads, t: &KernelTuning) -> (u32, usize) {
        match self {
            PrefillKernel::Wgmma => (256, heads.q / 2),
            PrefillKernel::TensorCore => {
                ((2 * heads.group() * self.tile(heads, t)) as u32, heads.kv)
            }
            // 8 threads a row (prefill_attention.cu).
            PrefillKernel::Scalar => ((t.pf_q * 8) as u32, heads.q),
        }
    }

    /// Dynamic shared memory of a block (the kernels' layouts).
    pub fn smem(self, heads: Heads, t: &KernelTuning) -> usize {
        let hd = heads.dim;
        match self {
            // K and V tiles of WG_K keys, double-buffered, and 64 query rows
            // for each of the two warpgroups, all bf16 without padding; then
            // the two stages' barriers and counters.
            PrefillKernel::Wgmma => (2 * 2 * t.wg_k + 2 * 64) * hd * 2 + 32,
            // K and V tiles of TC_K keys, double-buffered, bf16 rows padded
            // by 8, and 16 query rows per warp (group * tile / 16 warps),
            // padded alike.
            PrefillKernel::TensorCore => {
                let warps = heads.group() * self.tile(heads, t) / 16;
                2 * 2 * t.tc_k * (hd + 8) * 2 + warps * 16 * (hd + 8) * 2
            }
            PrefillKernel::Scalar => 4 * (t.pf_q * hd + t.pf_k * (2 * hd + 1) + t.pf_q * t.pf_k),
        }
    }
}

/// The query tiles of a prefill step: tile `i` covers rows `row0[i] ..
/// row0[i] + rows[i]`, all of sequence `seq[i]`.
#[derive(Clone, Copy)]
pub(super) struct PrefillTiles {
    pub seq: Dev<i32>,
    pub row0: Dev<i32>,
    pub rows: Dev<i32>,
    pub count: usize,
}

/// Where a prefill-attention kernel reads Q, K and V.
pub(super) enum PrefillSource<'a> {
    /// The mma.sync and scalar kernels: the f32 query in the QKV rows (scaled
    /// by `scale` as they load it), K and V through the cache pointers.
    Pointers { qkv: Dev<f32>, scale: f32 },
    /// The wgmma kernel: the bf16 query `rope_kv_write` left scaled in
    /// `q16`, K and V through the pool's TMA map from this layer's rows
    /// (`k_row0`, `v_row0`: the first row of its K and V planes).
    Tma {
        q16: Dev<bf16>,
        map: &'a TmaMap,
        k_row0: i32,
        v_row0: i32,
    },
}

/// Causal prefill attention of one layer over the paged cache.
pub(super) struct PrefillAttention<'a> {
    /// `[rows, q_dim]` bf16.
    pub out: Dev<bf16>,
    pub source: PrefillSource<'a>,
    pub kv: PagedKv,
    /// Each row's position.
    pub positions: Dev<i32>,
    pub tiles: PrefillTiles,
    pub heads: Heads,
}

/// How the fused projections launch: early or not, at most `max_blocks`
/// blocks (else two per SM), and at least `smem_floor` bytes of dynamic
/// shared memory a block (see `gemv_smem_floor` in mod.rs).
#[derive(Clone, Copy, Debug)]
pub(super) struct GemvLaunch {
    pub early: bool,
    pub max_blocks: Option<usize>,
    pub smem_floor: u32,
}

/// `gemv_qkv_M`: RMSNorm, QKV projection, bias, RoPE and the KV write of
/// `rows` (1, 2 or 4) tokens.
pub(super) struct GemvQkv {
    /// `[rows, q_dim + 2 * kv_dim]` f32: the rotated Q is written here.
    pub qkv: Dev<f32>,
    pub k_cache: Dev<bf16>,
    pub v_cache: Dev<bf16>,
    /// `[q_dim + 2 * kv_dim, hidden]`.
    pub w: Dev<bf16>,
    pub bias: Option<Dev<f32>>,
    /// The residual stream, `[rows, hidden]`.
    pub x: Dev<f32>,
    pub norm: Dev<f32>,
    pub eps: f32,
    pub inv_freq: Dev<f32>,
    pub positions: Dev<i32>,
    pub slots: Dev<i32>,
    pub hidden: usize,
    pub heads: Heads,
    pub rows: usize,
}

/// `gemv_silu_M`: `act = silu(norm(x) · w_gate^T) * (norm(x) · w_up^T)`.
pub(super) struct GemvSilu {
    pub act: Dev<bf16>,
    /// `[2 * f, hidden]`: gate rows, then up rows.
    pub w: Dev<bf16>,
    pub x: Dev<f32>,
    pub norm: Dev<f32>,
    pub eps: f32,
    pub hidden: usize,
    pub f: usize,
    pub rows: usize,
}

/// The input rows of `gemv_out_M`.
#[derive(Clone, Copy)]
pub(super) enum GemvInput {
    /// bf16 rows of width `k` (attention output, SiLU·mul).
    Bf16(Dev<bf16>),
    /// Rows `gather[m]` of the f32 residual stream, RMS-normalised with
    /// `norm` (the final norm before the output head).
    Normed {
        x: Dev<f32>,
        norm: Dev<f32>,
        gather: Dev<i32>,
    },
}

/// `gemv_out_M`: `out[m] (+)= w · input[m]`, `n` outputs of `k` inputs.
pub(super) struct GemvOut {
    /// `[rows, n]` f32.
    pub out: Dev<f32>,
    /// `[n, k]`.
    pub w: Dev<bf16>,
    pub input: GemvInput,
    pub eps: f32,
    pub k: usize,
    pub n: usize,
    /// Add to what `out` holds (the residual adds) instead of overwriting.
    pub accumulate: bool,
    pub rows: usize,
}

/// `kv_gather`: K and V of positions `0 .. tokens` (through `table`) out of
/// one layer's cache, as `[tokens, kv_dim]` each.
pub(super) struct KvGather {
    pub k_out: Dev<bf16>,
    pub v_out: Dev<bf16>,
    pub k_cache: Dev<bf16>,
    pub v_cache: Dev<bf16>,
    pub table: Dev<i32>,
    pub tokens: usize,
    pub kv_dim: usize,
    pub block_size: usize,
}

/// `kv_scatter`: K and V of positions `start_pos .. start_pos + tokens` into
/// one layer's cache.
pub(super) struct KvScatter {
    pub k_cache: Dev<bf16>,
    pub v_cache: Dev<bf16>,
    pub k_in: Dev<bf16>,
    pub v_in: Dev<bf16>,
    pub table: Dev<i32>,
    pub start_pos: usize,
    pub tokens: usize,
    pub kv_dim: usize,
    pub block_size: usize,
}

/// `kv_copy_blocks` (peer_copy.cu, the cuda-ipc program): every plane's
/// block `src_blocks[i]` of this pool into block `dst_blocks[i]` of a peer's
/// mapped pool, for `blocks` blocks of `planes` planes.
pub(super) struct PeerCopy {
    pub src: Dev<u8>,
    pub dst: Dev<u8>,
    pub src_blocks: Dev<u32>,
    pub dst_blocks: Dev<u32>,
    /// Bytes from one plane (a layer's K or V) to the next, in each pool.
    pub src_plane: u64,
    pub dst_plane: u64,
    pub block_bytes: u64,
    pub blocks: usize,
    pub planes: usize,
}

impl Gpu {
    /// Fills `n` bf16 at `out` with uniform values in `[-scale, scale]`
    /// (the same for a seed on any card).
    pub fn fill_uniform(
        &self,
        out: Dev<bf16>,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<(), CudaError> {
        let n = n as u64;
        // SAFETY: the kernel writes n bf16 at `out`.
        unsafe {
            self.launch(
                &self.kernels.fill_uniform_bf16,
                grid_stride(self.num_sms),
                args![out, n, seed, scale],
            )
        }
    }

    /// Fills `n` f32 at `out` with `value`.
    pub fn fill_f32(&self, out: Dev<f32>, n: usize, value: f32) -> Result<(), CudaError> {
        let n = n as u64;
        // SAFETY: the kernel writes n f32 at `out`.
        unsafe {
            self.launch(
                &self.kernels.fill_f32,
                grid_stride(self.num_sms),
                args![out, n, value],
            )
        }
    }

    /// `x[t] = embed[tokens[t]]` (as f32) for `rows` tokens.
    pub fn embed_gather(
        &self,
        x: Dev<f32>,
        embed: Dev<bf16>,
        tokens: Dev<i32>,
        rows: usize,
        hidden: usize,
    ) -> Result<(), CudaError> {
        let hidden = hidden as i32;
        // SAFETY: one block a token reads its embedding row and writes `hidden` floats of x.
        unsafe {
            self.launch(
                &self.kernels.embed_gather,
                rows_cfg(rows, 256),
                args![x, embed, tokens, hidden],
            )
        }
    }

    /// RMSNorm of rows of the residual stream into bf16 ([`RmsNorm`]).
    pub fn rms_norm(&self, a: &RmsNorm) -> Result<(), CudaError> {
        // A warp's worth of threads per 4 * RMS_VEC values, at most 1024.
        let per_thread = 4 * self.tuning.rms_vec;
        let threads = (a.hidden.div_ceil(per_thread * 32) as u32 * 32).clamp(32, 1024);
        let (out, x, w, rows) = (a.out, a.x, a.weight, Dev::or_null(a.gather));
        let (hidden, eps) = (a.hidden as i32, a.eps);
        // SAFETY: one block an output row, reading row `rows[r]` (or `r`) of x.
        unsafe {
            self.launch(
                &self.kernels.rms_norm,
                rows_cfg(a.rows, threads),
                args![out, x, w, rows, hidden, eps],
            )
        }
    }

    /// The step's RoPE rotations: `cs[t][j] = (cos, sin)(positions[t] *
    /// inv_freq[j])` for `tokens` tokens, for every layer's
    /// [`Gpu::rope_kv_write`].
    pub fn rope_table(
        &self,
        cs: Dev<[f32; 2]>,
        inv_freq: Dev<f32>,
        positions: Dev<i32>,
        tokens: usize,
        head_dim: usize,
    ) -> Result<(), CudaError> {
        let n = tokens * head_dim / 2;
        let blocks = n.div_ceil(256).min(4 * self.num_sms as usize);
        let (tokens, half) = (tokens as i32, (head_dim / 2) as i32);
        // SAFETY: writes tokens * half pairs at `cs`.
        unsafe {
            self.launch(
                &self.kernels.rope_table,
                rows_cfg(blocks, 256),
                args![cs, inv_freq, positions, tokens, half],
            )
        }
    }

    /// Bias, RoPE and the KV-cache write of the QKV GEMM's rows ([`RopeKvWrite`]).
    pub fn rope_kv_write(&self, a: &RopeKvWrite) -> Result<(), CudaError> {
        let (qkv, bias, rope_cs, slots) = (a.qkv, Dev::or_null(a.bias), a.rope_cs, a.slots);
        let (k_cache, v_cache) = (a.k_cache, a.v_cache);
        let (kv_out, q_out, q_scale) = (Dev::or_null(a.kv_out), Dev::or_null(a.q_out), a.q_scale);
        let (nh, nkv, hd) = a.heads.ints();
        // SAFETY: one block a token, within its QKV row and cache slot.
        unsafe {
            self.launch(
                &self.kernels.rope_kv_write,
                rows_cfg(a.rows, 256),
                args![
                    qkv, bias, rope_cs, slots, k_cache, v_cache, kv_out, q_out, q_scale, nh, nkv,
                    hd
                ],
            )
        }
    }

    /// `act[t, i] = silu(gate[t, i]) * up[t, i]` for `tokens` rows of `f`.
    pub fn silu_mul(
        &self,
        act: Dev<bf16>,
        gate_up: GateUp,
        tokens: usize,
        f: usize,
    ) -> Result<(), CudaError> {
        // Eight values a thread: x along a row, y over the tokens.
        let cfg = LaunchConfig {
            grid_dim: ((f / 8).div_ceil(256) as u32, tokens.min(65535) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (tokens, f) = (tokens as i32, f as i32);
        // SAFETY: reads `tokens` rows of 2f gate/up values, writes as many of f.
        unsafe {
            match gate_up {
                GateUp::Bf16(gu) => {
                    self.launch(&self.kernels.silu_mul, cfg, args![act, gu, tokens, f])
                }
                GateUp::F32(gu) => {
                    self.launch(&self.kernels.silu_mul_f32, cfg, args![act, gu, tokens, f])
                }
            }
        }
    }

    /// Decode attention ([`DecodeAttention`]): `decode_attention_v2` where
    /// it is compiled for the head dim and group, else the older kernel.
    /// With `early`, as a programmatic dependent launch.
    pub fn decode_attention(&self, early: bool, a: &DecodeAttention) -> Result<(), CudaError> {
        let t = &self.tuning;
        let heads = a.heads;
        let group = heads.group();
        let (qkv, k, v, tables, positions) = (
            a.qkv,
            a.kv.k_cache,
            a.kv.v_cache,
            a.kv.block_tables,
            a.positions,
        );
        let s = a.scratch;
        let (pm, ps, po, counters, out) = (s.part_max, s.part_sum, s.part_out, s.counters, a.out);
        let (nh, nkv, hd) = heads.ints();
        let (block_size, max_blocks) = (a.kv.block_size as i32, a.kv.max_blocks as i32);
        let scale = a.scale;
        let grid = (a.seqs as u32, heads.kv as u32, a.splits as u32);
        let block = (32 * t.decode_warps as u32, 1, 1);
        if let Some(ki) = decode_v2_index(heads.dim, group) {
            // Partial max and sum, then output rows, per (warp, head of
            // the group bound) for the merge across warps.
            let g = DECODE_V2_GROUPS[ki % DECODE_V2_GROUPS.len()];
            let smem = 4 * t.decode_warps * g * (2 + heads.dim);
            let cfg = LaunchConfig {
                grid_dim: grid,
                block_dim: block,
                shared_mem_bytes: smem as u32,
            };
            // SAFETY: the kernel calls pdl_wait before reading the step's
            // outputs; the scratch holds seqs x heads x splits rows.
            return unsafe {
                self.launch_ex(
                    &self.kernels.decode_attention_v2[ki],
                    cfg,
                    early,
                    args![
                        qkv, k, v, tables, positions, pm, ps, po, counters, out, nh, nkv,
                        block_size, max_blocks, scale
                    ],
                )
            };
        }
        let smem = 4
            * (group * heads.dim + group * t.decode_partition + t.decode_warps * group * heads.dim);
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: smem as u32,
        };
        let kernel = self.kernels.decode_attention[heads.dim / 32 - 1]
            .as_ref()
            .expect("compiled for every head dim decode_attention_v2 lacks");
        let splits = a.splits as i32;
        // SAFETY: as above.
        unsafe {
            self.launch_ex(
                kernel,
                cfg,
                early,
                args![
                    qkv, k, v, tables, positions, pm, ps, po, counters, out, nh, nkv, hd,
                    block_size, max_blocks, splits, scale
                ],
            )
        }
    }

    /// Causal prefill attention with `kernel` ([`PrefillAttention`]).
    pub fn prefill_attention(
        &self,
        kernel: PrefillKernel,
        a: &PrefillAttention<'_>,
    ) -> Result<(), CudaError> {
        let heads = a.heads;
        let (threads, heads_in_grid) = kernel.block(heads, &self.tuning);
        let cfg = LaunchConfig {
            // The wgmma kernel takes its tiles along y (prefill_attention_wg.cu).
            grid_dim: if kernel == PrefillKernel::Wgmma {
                (heads_in_grid as u32, a.tiles.count as u32, 1)
            } else {
                (a.tiles.count as u32, heads_in_grid as u32, 1)
            },
            block_dim: (threads, 1, 1),
            shared_mem_bytes: kernel.smem(heads, &self.tuning) as u32,
        };
        let (out, tables, positions) = (a.out, a.kv.block_tables, a.positions);
        let (tile_seq, tile_row0, tile_rows) = (a.tiles.seq, a.tiles.row0, a.tiles.rows);
        let (nh, nkv, hd) = heads.ints();
        let (block_size, max_blocks) = (a.kv.block_size as i32, a.kv.max_blocks as i32);
        let func: &CudaFunction = match (kernel, heads.dim) {
            (PrefillKernel::Wgmma, hd) => {
                let wg = self
                    .kernels
                    .prefill_attention_wg
                    .as_ref()
                    .expect("chosen only when compiled");
                &wg[usize::from(hd == 128)]
            }
            (PrefillKernel::TensorCore, 64) => &self.kernels.prefill_attention_tc64,
            (PrefillKernel::TensorCore, _) => &self.kernels.prefill_attention_tc128,
            (PrefillKernel::Scalar, _) => &self.kernels.prefill_attention,
        };
        // SAFETY: the prefill kernels take these arguments; blocks stay in
        // their tiles' rows, and the TMA map covers the whole pool (rows
        // past it read as zeros).
        unsafe {
            match (kernel, &a.source) {
                (
                    PrefillKernel::Wgmma,
                    &PrefillSource::Tma {
                        q16,
                        map,
                        k_row0,
                        v_row0,
                    },
                ) => {
                    let map = *map;
                    self.launch(
                        func,
                        cfg,
                        args![
                            out, q16, map, k_row0, v_row0, tables, positions, tile_seq, tile_row0,
                            tile_rows, nh, nkv, hd, block_size, max_blocks
                        ],
                    )
                }
                (
                    PrefillKernel::TensorCore | PrefillKernel::Scalar,
                    &PrefillSource::Pointers { qkv, scale },
                ) => {
                    let (k, v) = (a.kv.k_cache, a.kv.v_cache);
                    self.launch(
                        func,
                        cfg,
                        args![
                            out, qkv, k, v, tables, positions, tile_seq, tile_row0, tile_rows, nh,
                            nkv, hd, block_size, max_blocks, scale
                        ],
                    )
                }
                _ => unreachable!(
                    "the wgmma kernel reads through the TMA map, the others through pointers"
                ),
            }
        }
    }

    /// The launch shape of a fused projection of `rows` input rows of width
    /// `k` and `pairs` pairs of output rows: a block of `GEMV_WARPS` warps
    /// stages the input rows in shared memory; at most two blocks per SM.
    fn gemv_cfg(&self, launch: &GemvLaunch, rows: usize, pairs: usize, k: usize) -> LaunchConfig {
        let warps = self.tuning.gemv_warps;
        LaunchConfig {
            grid_dim: (
                pairs
                    .div_ceil(warps)
                    .min(2 * self.num_sms as usize)
                    .min(launch.max_blocks.unwrap_or(usize::MAX)) as u32,
                1,
                1,
            ),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: ((rows * k * 2) as u32).max(launch.smem_floor),
        }
    }

    /// The `gemv_*` kernel index for `rows` input rows.
    fn gemv_kernel(rows: usize) -> Result<usize, CudaError> {
        gemv_index(rows)
            .ok_or_else(|| CudaError::Unsupported(format!("no fused projection for {rows} rows")))
    }

    /// RMSNorm + QKV + bias + RoPE + KV write in one kernel ([`GemvQkv`]).
    pub fn gemv_qkv(&self, launch: &GemvLaunch, a: &GemvQkv) -> Result<(), CudaError> {
        let heads = a.heads;
        let pairs = (heads.q + heads.kv) * heads.dim / 2 + heads.kv_dim() / 2;
        let cfg = self.gemv_cfg(launch, a.rows, pairs, a.hidden);
        let func = &self.kernels.gemv_qkv[Self::gemv_kernel(a.rows)?];
        let (qkv, k_cache, v_cache, w, bias, x, norm, eps) = (
            a.qkv,
            a.k_cache,
            a.v_cache,
            a.w,
            Dev::or_null(a.bias),
            a.x,
            a.norm,
            a.eps,
        );
        let (inv_freq, positions, slots) = (a.inv_freq, a.positions, a.slots);
        let hidden = a.hidden as i32;
        let (nh, nkv, hd) = heads.ints();
        // SAFETY: the fused kernels call pdl_wait before reading the previous
        // kernel's output; weights of the stated shape.
        unsafe {
            self.launch_ex(
                func,
                cfg,
                launch.early,
                args![
                    qkv, k_cache, v_cache, w, bias, x, norm, eps, inv_freq, positions, slots,
                    hidden, nh, nkv, hd
                ],
            )
        }
    }

    /// RMSNorm + gate/up + SiLU·mul in one kernel ([`GemvSilu`]).
    pub fn gemv_silu(&self, launch: &GemvLaunch, a: &GemvSilu) -> Result<(), CudaError> {
        let cfg = self.gemv_cfg(launch, a.rows, a.f, a.hidden);
        let func = &self.kernels.gemv_silu[Self::gemv_kernel(a.rows)?];
        let (act, w, x, norm, eps) = (a.act, a.w, a.x, a.norm, a.eps);
        let (hidden, f) = (a.hidden as i32, a.f as i32);
        // SAFETY: as for gemv_qkv.
        unsafe {
            self.launch_ex(
                func,
                cfg,
                launch.early,
                args![act, w, x, norm, eps, hidden, f],
            )
        }
    }

    /// A projection of bf16 or normalised rows, overwriting or adding to
    /// `out` ([`GemvOut`]).
    pub fn gemv_out(&self, launch: &GemvLaunch, a: &GemvOut) -> Result<(), CudaError> {
        let cfg = self.gemv_cfg(launch, a.rows, a.n.div_ceil(2), a.k);
        let func = &self.kernels.gemv_out[Self::gemv_kernel(a.rows)?];
        let (input, x, norm, gather) = match a.input {
            GemvInput::Bf16(input) => (input, Dev::NULL, Dev::NULL, Dev::NULL),
            GemvInput::Normed { x, norm, gather } => (Dev::NULL, x, norm, gather),
        };
        let (out, w, eps) = (a.out, a.w, a.eps);
        let (k, n, accumulate) = (a.k as i32, a.n as i32, i32::from(a.accumulate));
        // SAFETY: as for gemv_qkv.
        unsafe {
            self.launch_ex(
                func,
                cfg,
                launch.early,
                args![out, w, input, x, norm, gather, eps, k, n, accumulate],
            )
        }
    }

    /// Samples `a.rows` rows of `a.logits` by their rules ([`SampleRows`]).
    pub fn sample_rows(&self, early: bool, a: &SampleRows) -> Result<(), CudaError> {
        let cfg = rows_cfg(a.rows, self.tuning.sample_threads as u32);
        let mask_words = a.vocab.div_ceil(32) as i32;
        let masks = a.masks.unwrap_or(Dev::NULL);
        let (next, logits, params, vocab) = (a.next, a.logits, a.params, a.vocab as i32);
        // SAFETY: one block a row; the kernel calls pdl_wait first; a mask
        // buffer holds `rows` rows of `mask_words` words.
        unsafe {
            self.launch_ex(
                &self.kernels.sample_rows,
                cfg,
                early,
                args![next, logits, params, vocab, masks, mask_words],
            )
        }
    }

    /// Copies KV blocks into a peer's pool with `copy`, the cuda-ipc
    /// program's `kv_copy_blocks` ([`PeerCopy`]).
    pub fn peer_copy(&self, copy: &CudaFunction, a: &PeerCopy) -> Result<(), CudaError> {
        let cfg = LaunchConfig {
            grid_dim: (a.blocks as u32, a.planes as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (src, dst, src_blocks, dst_blocks) = (a.src, a.dst, a.src_blocks, a.dst_blocks);
        let (src_plane, dst_plane, block_bytes) = (a.src_plane, a.dst_plane, a.block_bytes);
        // SAFETY: the caller bounded every block id by its pool, and both
        // pools span `planes` planes of their stride.
        unsafe {
            self.launch(
                copy,
                cfg,
                args![
                    src,
                    dst,
                    src_blocks,
                    dst_blocks,
                    src_plane,
                    dst_plane,
                    block_bytes
                ],
            )
        }
    }

    /// Copies K and V of one layer's positions out of the cache ([`KvGather`]).
    pub fn kv_gather(&self, a: &KvGather) -> Result<(), CudaError> {
        let (k_out, v_out, k_cache, v_cache, table) =
            (a.k_out, a.v_out, a.k_cache, a.v_cache, a.table);
        let (n, w, bs) = (a.tokens as i32, a.kv_dim as i32, a.block_size as i32);
        // SAFETY: one block a position, within the table's blocks.
        unsafe {
            self.launch(
                &self.kernels.kv_gather,
                rows_cfg(a.tokens, 256),
                args![k_out, v_out, k_cache, v_cache, table, n, w, bs],
            )
        }
    }

    /// Writes K and V of one layer's positions into the cache ([`KvScatter`]).
    pub fn kv_scatter(&self, a: &KvScatter) -> Result<(), CudaError> {
        let (k_cache, v_cache, k_in, v_in, table) = (a.k_cache, a.v_cache, a.k_in, a.v_in, a.table);
        let (sp, w, bs) = (a.start_pos as i32, a.kv_dim as i32, a.block_size as i32);
        // SAFETY: one block a position, within the table's blocks.
        unsafe {
            self.launch(
                &self.kernels.kv_scatter,
                rows_cfg(a.tokens, 256),
                args![k_cache, v_cache, k_in, v_in, table, sp, w, bs],
            )
        }
    }
}
