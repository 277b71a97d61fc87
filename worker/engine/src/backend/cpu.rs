//! The CPU backend: multi-threaded (rayon) f32 compute of the Llama family over
//! a paged KV cache.
//!
//! Decode is bound by reading the weights once per step, so matrices are kept
//! compact ([`WeightStorage::Compact`], the default): as Q4 blocks (32 4-bit
//! levels with an f32 scale and min, 0.75 bytes per weight) when the values
//! already lie on such a grid, which is the case for weights dequantized from
//! GGUF Q4_1 (so this is lossless), else as Q8 blocks (32 `i8` sharing an f32
//! scale, 1.125 bytes per weight; exact for GGUF Q8_0). Blocks are
//! dequantized on the fly inside the dot product (AVX2 + FMA when the CPU has
//! them) against f32 activations. Activations, norms, biases, RoPE, attention
//! and the KV cache stay f32, so the only rounding beyond f32 arithmetic is
//! the one-time weight packing; [`dequantized_weights`] reproduces it exactly
//! for reference checks. Every sequence of a step is batched into each matrix product so the
//! weights are read once per step, not once per sequence.

use rayon::prelude::*;

use super::{
    check_blocks_in_pool, check_kv_geometry, check_kv_layer, check_token, check_weights,
    BackendError, ComputeBackend, KvLayerSink, SeqInput,
};
use tandem_api::types::{KvDtype, KvExport};
use tandem_model::{ModelConfig, Tensor, Weights};

/// How the backend stores weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// Exact f32 (4 bytes per weight).
    F32,
    /// Blocks of 32 `i8` with one f32 scale (1.125 bytes per weight);
    /// matrices whose input width is not a multiple of 32 stay f32.
    Q8,
    /// Q4 (blocks of 32 4-bit levels with an f32 scale and min: 0.75 bytes per
    /// weight) for matrices whose values already lie on such a grid, as those
    /// dequantized from GGUF Q4_1 do, so nothing is lost; Q8 for the rest.
    #[default]
    Compact,
}

/// Weights per Q8 block.
pub const Q8_BLOCK: usize = 32;

/// Steps with at least this many tokens multiply quantized matrices through
/// rows unpacked to f32 (see `Matrix::matmul_unpacked`).
const PREFILL_MIN_TOKENS: usize = 16;

/// Tokens of activations processed against one weight row before moving to
/// the next row: keeps that activation tile (16 x hidden f32) in L1 during long
/// prefills. Measured on the SmolLM2 shape: 64-token steps ran 25% faster per
/// CPU second than with a 64-token tile.
const TOKEN_TILE: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
}

impl Kernel {
    /// Every kernel this CPU can run, best last.
    fn available() -> Vec<Self> {
        #[allow(unused_mut)]
        let mut out = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            // An AVX-512 variant of the Q8 kernel was measured 10-20% slower per
            // CPU second on this project's (Zen) CPUs, so AVX2 is the best here.
            if has!("avx2") && has!("fma") {
                out.push(Kernel::Avx2Fma);
            }
        }
        out
    }

    fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => "avx2",
        }
    }

    /// The best kernel, or the one `TANDEM_CPU_KERNEL` names (portable, avx2)
    /// when this CPU can run it: for A/B measurements and for working
    /// around a misbehaving SIMD path.
    fn detect() -> Self {
        let available = Self::available();
        if let Ok(wanted) = std::env::var("TANDEM_CPU_KERNEL") {
            match available.iter().find(|k| k.name() == wanted) {
                Some(k) => return *k,
                None => tracing::warn!(
                    wanted,
                    "TANDEM_CPU_KERNEL names a kernel this CPU cannot run; using the best available"
                ),
            }
        }
        *available.last().expect("portable always exists")
    }
}

/// Quantizes one block (≤ 32 values) to `i8` with a shared scale.
fn quantize_block(values: &[f32], out: &mut [i8]) -> f32 {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in out.iter_mut().zip(values) {
        *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

/// Packs a block of 32 values as 4-bit offsets from its minimum if they sit
/// on such a grid already (up to f32 rounding), as weights dequantized from a
/// GGUF Q4_1 tensor do. Returns `(scale, min)`; `None` if packing would lose
/// precision.
fn pack_q4_block(values: &[f32], out: &mut [u8]) -> Option<(f32, f32)> {
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    let scale = (max - min) / 15.0;
    let tolerance = 1e-6 * max.abs().max(min.abs()).max(f32::MIN_POSITIVE);
    let mut q = [0u8; Q8_BLOCK];
    for (q, v) in q.iter_mut().zip(values) {
        let level = if scale > 0.0 {
            ((v - min) / scale).round()
        } else {
            0.0
        };
        if !(0.0..=15.0).contains(&level) || (scale * level + min - v).abs() > tolerance {
            return None;
        }
        *q = level as u8;
    }
    // Byte j holds element j (low nibble) and element j + 16 (high nibble).
    for j in 0..Q8_BLOCK / 2 {
        out[j] = q[j] | (q[j + Q8_BLOCK / 2] << 4);
    }
    Some((scale, min))
}

/// A linear layer's weight, `[rows = out_features, cols = in_features]`.
enum Matrix {
    F32 {
        rows: usize,
        cols: usize,
        data: Vec<f32>,
    },
    Q8 {
        rows: usize,
        cols: usize,
        qs: Vec<i8>,
        scales: Vec<f32>,
    },
    /// 4-bit levels per block of 32: value = scale * level + min.
    Q4 {
        rows: usize,
        cols: usize,
        packed: Vec<u8>,
        scales: Vec<f32>,
        mins: Vec<f32>,
    },
}

impl Matrix {
    fn new(rows: usize, cols: usize, data: &[f32], storage: WeightStorage) -> Self {
        assert_eq!(rows * cols, data.len());
        if storage == WeightStorage::F32 || !cols.is_multiple_of(Q8_BLOCK) {
            return Matrix::F32 {
                rows,
                cols,
                data: data.to_vec(),
            };
        }
        if storage == WeightStorage::Compact {
            let blocks = data.len() / Q8_BLOCK;
            let mut packed = vec![0u8; data.len() / 2];
            let mut scales = vec![0f32; blocks];
            let mut mins = vec![0f32; blocks];
            let lossless = packed
                .par_chunks_mut(Q8_BLOCK / 2)
                .zip(scales.par_iter_mut().zip(mins.par_iter_mut()))
                .zip(data.par_chunks(Q8_BLOCK))
                .all(|((out, (scale, min)), v)| match pack_q4_block(v, out) {
                    Some((s, m)) => {
                        *scale = s;
                        *min = m;
                        true
                    }
                    None => false,
                });
            if lossless {
                return Matrix::Q4 {
                    rows,
                    cols,
                    packed,
                    scales,
                    mins,
                };
            }
        }
        let mut qs = vec![0i8; data.len()];
        let mut scales = vec![0f32; data.len() / Q8_BLOCK];
        qs.par_chunks_mut(Q8_BLOCK)
            .zip(scales.par_iter_mut())
            .zip(data.par_chunks(Q8_BLOCK))
            .for_each(|((q, s), v)| *s = quantize_block(v, q));
        Matrix::Q8 {
            rows,
            cols,
            qs,
            scales,
        }
    }

    fn rows(&self) -> usize {
        match self {
            Matrix::F32 { rows, .. } | Matrix::Q8 { rows, .. } | Matrix::Q4 { rows, .. } => *rows,
        }
    }

    fn cols(&self) -> usize {
        match self {
            Matrix::F32 { cols, .. } | Matrix::Q8 { cols, .. } | Matrix::Q4 { cols, .. } => *cols,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Matrix::F32 { data, .. } => data.len() * 4,
            Matrix::Q8 { qs, scales, .. } => qs.len() + scales.len() * 4,
            Matrix::Q4 {
                packed,
                scales,
                mins,
                ..
            } => packed.len() + (scales.len() + mins.len()) * 4,
        }
    }

    fn storage_name(&self) -> &'static str {
        match self {
            Matrix::F32 { .. } => "f32",
            Matrix::Q8 { .. } => "q8",
            Matrix::Q4 { .. } => "q4",
        }
    }

    /// Row `r` as f32 (an embedding lookup).
    fn row_into(&self, r: usize, out: &mut [f32]) {
        match self {
            Matrix::F32 { cols, data, .. } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
            Matrix::Q8 {
                cols, qs, scales, ..
            } => {
                let q = &qs[r * cols..(r + 1) * cols];
                let s = &scales[r * cols / Q8_BLOCK..(r + 1) * cols / Q8_BLOCK];
                for ((o, q), s) in out.chunks_mut(Q8_BLOCK).zip(q.chunks(Q8_BLOCK)).zip(s) {
                    for (o, q) in o.iter_mut().zip(q) {
                        *o = *q as f32 * s;
                    }
                }
            }
            Matrix::Q4 {
                cols,
                packed,
                scales,
                mins,
                ..
            } => {
                let nb = cols / Q8_BLOCK;
                let half = Q8_BLOCK / 2;
                for (b, o) in out.chunks_mut(Q8_BLOCK).enumerate() {
                    let bytes = &packed[(r * nb + b) * half..(r * nb + b + 1) * half];
                    let (scale, min) = (scales[r * nb + b], mins[r * nb + b]);
                    for (j, byte) in bytes.iter().enumerate() {
                        o[j] = scale * (byte & 0x0F) as f32 + min;
                        o[j + half] = scale * (byte >> 4) as f32 + min;
                    }
                }
            }
        }
    }

    /// Dot products of row `r` with `N` activation rows; `xsums` holds each
    /// activation row's per-block sums (needed by Q4 only, else empty).
    #[inline]
    fn dot_row<const N: usize>(
        &self,
        kernel: Kernel,
        r: usize,
        xs: [&[f32]; N],
        xsums: [&[f32]; N],
    ) -> [f32; N] {
        match self {
            Matrix::F32 { cols, data, .. } => {
                let w = &data[r * cols..(r + 1) * cols];
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the kernel was chosen after detecting AVX2 and FMA; all
                    // slices have `cols` elements.
                    Kernel::Avx2Fma => unsafe { x86::dot_f32::<N>(w, xs) },
                    Kernel::Portable => portable_dot_f32(w, xs),
                }
            }
            Matrix::Q8 {
                cols, qs, scales, ..
            } => {
                let q = &qs[r * cols..(r + 1) * cols];
                let s = &scales[r * cols / Q8_BLOCK..(r + 1) * cols / Q8_BLOCK];
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above; `cols` is a multiple of the block size.
                    Kernel::Avx2Fma => unsafe { x86::dot_q8::<N>(q, s, xs) },
                    Kernel::Portable => portable_dot_q8(q, s, xs),
                }
            }
            Matrix::Q4 {
                cols,
                packed,
                scales,
                mins,
                ..
            } => {
                let nb = cols / Q8_BLOCK;
                let p = &packed[r * cols / 2..(r + 1) * cols / 2];
                let (s, m) = (&scales[r * nb..(r + 1) * nb], &mins[r * nb..(r + 1) * nb]);
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as above; `xsums` rows have one entry per block.
                    Kernel::Avx2Fma => unsafe { x86::dot_q4::<N>(p, s, m, xs, xsums) },
                    Kernel::Portable => portable_dot_q4(p, s, m, xs, xsums),
                }
            }
        }
    }

    /// Dot products of row `r` with activation rows `t .. t + N`.
    #[inline]
    fn dot_group<const N: usize>(
        &self,
        kernel: Kernel,
        r: usize,
        x: &[f32],
        xsums: &[f32],
        t: usize,
    ) -> [f32; N] {
        let cols = self.cols();
        let nb = cols / Q8_BLOCK;
        let xs: [&[f32]; N] = std::array::from_fn(|i| &x[(t + i) * cols..(t + i + 1) * cols]);
        let sums: [&[f32]; N] = std::array::from_fn(|i| {
            if xsums.is_empty() {
                xsums
            } else {
                &xsums[(t + i) * nb..(t + i + 1) * nb]
            }
        });
        self.dot_row(kernel, r, xs, sums)
    }

    /// `out[t, r] = Σ_c self[r, c] · x[t, c]` for `t` in `0..tokens`.
    fn matmul(&self, kernel: Kernel, x: &[f32], tokens: usize, out: &mut [f32]) {
        let (rows, cols) = (self.rows(), self.cols());
        debug_assert_eq!(x.len(), tokens * cols);
        debug_assert_eq!(out.len(), tokens * rows);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2Fma
            && tokens >= PREFILL_MIN_TOKENS
            && !matches!(self, Matrix::F32 { .. })
        {
            self.matmul_unpacked(x, tokens, out);
            return;
        }
        // Q4 rows add `min * Σ x` per block: sum each activation block once.
        let xsums: Vec<f32> = match self {
            Matrix::Q4 { .. } => x.chunks(Q8_BLOCK).map(|c| c.iter().sum()).collect(),
            _ => Vec::new(),
        };
        // Activation rows multiplied with one unpacked weight block at a time
        // (unpacking is paid once per group). Measured per CPU second on the
        // SmolLM2 shape: Q4 gains up to 8 (its unpacking costs more), Q8
        // and f32 lose beyond 4 (their kernels run out of registers).
        let max_group = match self {
            Matrix::Q4 { .. } => 8,
            _ => 4,
        };
        let tasks = rayon::current_num_threads() * 4;
        let rows_per_task = rows.div_ceil(tasks).max(4);
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..rows.div_ceil(rows_per_task))
            .into_par_iter()
            .for_each(|task| {
                let r0 = task * rows_per_task;
                let r1 = (r0 + rows_per_task).min(rows);
                let store = |t: usize, r: usize, values: &[f32]| {
                    for (i, v) in values.iter().enumerate() {
                        // SAFETY: each task owns rows r0..r1 of every token's
                        // output row, so writes never overlap; t + i < tokens.
                        unsafe { *out_ptr.get().add((t + i) * rows + r) = *v }
                    }
                };
                for t0 in (0..tokens).step_by(TOKEN_TILE) {
                    let t1 = (t0 + TOKEN_TILE).min(tokens);
                    for r in r0..r1 {
                        let mut t = t0;
                        while t < t1 {
                            let n = (t1 - t).min(max_group);
                            match n {
                                1 => store(t, r, &self.dot_group::<1>(kernel, r, x, &xsums, t)),
                                2 => store(t, r, &self.dot_group::<2>(kernel, r, x, &xsums, t)),
                                3 => store(t, r, &self.dot_group::<3>(kernel, r, x, &xsums, t)),
                                4 => store(t, r, &self.dot_group::<4>(kernel, r, x, &xsums, t)),
                                5 => store(t, r, &self.dot_group::<5>(kernel, r, x, &xsums, t)),
                                6 => store(t, r, &self.dot_group::<6>(kernel, r, x, &xsums, t)),
                                7 => store(t, r, &self.dot_group::<7>(kernel, r, x, &xsums, t)),
                                _ => store(t, r, &self.dot_group::<8>(kernel, r, x, &xsums, t)),
                            }
                            t += n;
                        }
                    }
                }
            });
    }
}

impl Matrix {
    /// The prefill path: with many activation rows, unpack two weight rows to
    /// f32 once per token tile, then multiply them with four activation rows
    /// at a time (eight accumulators), which does twice the multiply-adds per
    /// load of the unpack-as-you-go kernels.
    #[cfg(target_arch = "x86_64")]
    fn matmul_unpacked(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        const TILE: usize = 64;
        let (rows, cols) = (self.rows(), self.cols());
        let tasks = rayon::current_num_threads() * 4;
        // Even, so row pairs never straddle two tasks.
        let rows_per_task = rows.div_ceil(tasks).max(4).next_multiple_of(2);
        let out_ptr = SharedMut(out.as_mut_ptr());
        (0..rows.div_ceil(rows_per_task))
            .into_par_iter()
            .for_each(|task| {
                let r0 = task * rows_per_task;
                let r1 = (r0 + rows_per_task).min(rows);
                let store = |t: usize, r: usize, v: f32| {
                    // SAFETY: each task owns rows r0..r1 of every token's
                    // output row, so writes never overlap; t < tokens.
                    unsafe { *out_ptr.get().add(t * rows + r) = v }
                };
                let xrow = |t: usize| &x[t * cols..(t + 1) * cols];
                let mut w = vec![0f32; 2 * cols];
                for t0 in (0..tokens).step_by(TILE) {
                    let t1 = (t0 + TILE).min(tokens);
                    for r in (r0..r1).step_by(2) {
                        let pair = r + 1 < r1;
                        let (w0, w1) = w.split_at_mut(cols);
                        self.row_into(r, w0);
                        if pair {
                            self.row_into(r + 1, w1);
                        }
                        let mut t = t0;
                        while t < t1 {
                            if pair && t + 4 <= t1 {
                                let xs = [xrow(t), xrow(t + 1), xrow(t + 2), xrow(t + 3)];
                                // SAFETY: AVX2 and FMA were detected (the caller
                                // checked the kernel); all rows have `cols` values.
                                let d = unsafe { x86::dot_f32_2x4(w0, w1, xs) };
                                for (i, (a, b)) in d[0].iter().zip(&d[1]).enumerate() {
                                    store(t + i, r, *a);
                                    store(t + i, r + 1, *b);
                                }
                                t += 4;
                            } else {
                                // SAFETY: as above.
                                let [a] = unsafe { x86::dot_f32::<1>(w0, [xrow(t)]) };
                                store(t, r, a);
                                if pair {
                                    // SAFETY: as above.
                                    let [b] = unsafe { x86::dot_f32::<1>(w1, [xrow(t)]) };
                                    store(t, r + 1, b);
                                }
                                t += 1;
                            }
                        }
                    }
                }
            });
    }
}

/// A raw pointer shared by parallel tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for disjoint writes from tasks joined before the owner is read.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn portable_dot_f32<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    let mut out = [0.0; N];
    for (o, x) in out.iter_mut().zip(xs) {
        *o = w.iter().zip(x).map(|(a, b)| a * b).sum();
    }
    out
}

fn portable_dot_q8<const N: usize>(q: &[i8], s: &[f32], xs: [&[f32]; N]) -> [f32; N] {
    let mut out = [0.0; N];
    for (o, x) in out.iter_mut().zip(xs) {
        *o = q
            .chunks(Q8_BLOCK)
            .zip(x.chunks(Q8_BLOCK))
            .zip(s)
            .map(|((q, x), s)| q.iter().zip(x).map(|(q, x)| *q as f32 * x).sum::<f32>() * s)
            .sum();
    }
    out
}

fn portable_dot_q4<const N: usize>(
    packed: &[u8],
    scales: &[f32],
    mins: &[f32],
    xs: [&[f32]; N],
    xsums: [&[f32]; N],
) -> [f32; N] {
    let half = Q8_BLOCK / 2;
    let mut out = [0.0; N];
    for ((o, x), sums) in out.iter_mut().zip(xs).zip(xsums) {
        for (b, (scale, min)) in scales.iter().zip(mins).enumerate() {
            let bytes = &packed[b * half..(b + 1) * half];
            let x = &x[b * Q8_BLOCK..(b + 1) * Q8_BLOCK];
            let levels: f32 = bytes
                .iter()
                .enumerate()
                .map(|(j, q)| (q & 0x0F) as f32 * x[j] + (q >> 4) as f32 * x[j + half])
                .sum();
            *o += scale * levels + min * sums[b];
        }
    }
    out
}

/// `y += a * x`.
#[inline]
fn axpy(kernel: Kernel, a: f32, x: &[f32], y: &mut [f32]) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected; `x` and `y` have equal length.
        Kernel::Avx2Fma => unsafe { x86::axpy(a, x, y) },
        Kernel::Portable => {
            for (y, x) in y.iter_mut().zip(x) {
                *y += a * x;
            }
        }
    }
}

#[inline]
fn dot(kernel: Kernel, a: &[f32], b: &[f32]) -> f32 {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2 and FMA were detected; `a` and `b` have equal length.
        Kernel::Avx2Fma => unsafe { x86::dot_f32::<1>(a, [b])[0] },
        Kernel::Portable => portable_dot_f32(a, [b])[0],
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::Q8_BLOCK;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Dot products of one f32 weight row with `N` activation rows of the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32<const N: usize>(w: &[f32], xs: [&[f32]; N]) -> [f32; N] {
        let n = w.len();
        let main = n / 16 * 16;
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        let wp = w.as_ptr();
        let mut i = 0;
        while i < main {
            let w0 = _mm256_loadu_ps(wp.add(i));
            let w1 = _mm256_loadu_ps(wp.add(i + 8));
            for k in 0..N {
                let xp = xs[k].as_ptr();
                acc0[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp.add(i)), acc0[k]);
                acc1[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(i + 8)), acc1[k]);
            }
            i += 16;
        }
        let mut out = [0.0f32; N];
        for k in 0..N {
            let mut s = hsum(_mm256_add_ps(acc0[k], acc1[k]));
            for j in main..n {
                s += w[j] * xs[k][j];
            }
            out[k] = s;
        }
        out
    }

    /// `y += a * x` for slices of equal length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
        let n = x.len();
        let main = n / 8 * 8;
        let av = _mm256_set1_ps(a);
        let (xp, yp) = (x.as_ptr(), y.as_mut_ptr());
        let mut i = 0;
        while i < main {
            let v = _mm256_fmadd_ps(av, _mm256_loadu_ps(xp.add(i)), _mm256_loadu_ps(yp.add(i)));
            _mm256_storeu_ps(yp.add(i), v);
            i += 8;
        }
        for j in main..n {
            y[j] += a * x[j];
        }
    }

    /// Dot products of two f32 weight rows with four activation rows, all of
    /// a length that is a multiple of 8.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32_2x4(w0: &[f32], w1: &[f32], xs: [&[f32]; 4]) -> [[f32; 4]; 2] {
        let mut a0 = [_mm256_setzero_ps(); 4];
        let mut a1 = [_mm256_setzero_ps(); 4];
        let (p0, p1) = (w0.as_ptr(), w1.as_ptr());
        let mut i = 0;
        while i < w0.len() {
            let v0 = _mm256_loadu_ps(p0.add(i));
            let v1 = _mm256_loadu_ps(p1.add(i));
            for k in 0..4 {
                let xv = _mm256_loadu_ps(xs[k].as_ptr().add(i));
                a0[k] = _mm256_fmadd_ps(v0, xv, a0[k]);
                a1[k] = _mm256_fmadd_ps(v1, xv, a1[k]);
            }
            i += 8;
        }
        let mut out = [[0.0f32; 4]; 2];
        for k in 0..4 {
            out[0][k] = hsum(a0[k]);
            out[1][k] = hsum(a1[k]);
        }
        out
    }

    /// Dot products of one Q8 weight row (`q`, per-block `s`) with `N` activation rows.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q8<const N: usize>(q: &[i8], s: &[f32], xs: [&[f32]; N]) -> [f32; N] {
        let mut acc = [_mm256_setzero_ps(); N];
        let qp = q.as_ptr();
        for (b, scale) in s.iter().enumerate() {
            let base = b * Q8_BLOCK;
            let mut even = [_mm256_setzero_ps(); N];
            let mut odd = [_mm256_setzero_ps(); N];
            let w = |j: usize| {
                let raw = _mm_loadl_epi64(qp.add(base + j * 8) as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw))
            };
            let (w0, w1, w2, w3) = (w(0), w(1), w(2), w(3));
            for k in 0..N {
                let xp = xs[k].as_ptr().add(base);
                even[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), even[k]);
                odd[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), odd[k]);
                even[k] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), even[k]);
                odd[k] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), odd[k]);
            }
            let sv = _mm256_set1_ps(*scale);
            for k in 0..N {
                acc[k] = _mm256_fmadd_ps(_mm256_add_ps(even[k], odd[k]), sv, acc[k]);
            }
        }
        let mut out = [0.0f32; N];
        for k in 0..N {
            out[k] = hsum(acc[k]);
        }
        out
    }

    /// Dot products of one Q4 weight row (packed levels, per-block scale and
    /// min) with `N` activation rows and their per-block sums.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_q4<const N: usize>(
        packed: &[u8],
        scales: &[f32],
        mins: &[f32],
        xs: [&[f32]; N],
        xsums: [&[f32]; N],
    ) -> [f32; N] {
        let mask = _mm256_set1_epi32(0x0F);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut offset = [0.0f32; N];
        let pp = packed.as_ptr();
        for (b, (scale, min)) in scales.iter().zip(mins).enumerate() {
            // Widening each byte to a 32-bit lane first leaves the high nibble
            // alone above bit 4, so one shift extracts it without a mask.
            let bytes = |at: usize| {
                let raw = _mm_loadl_epi64(pp.add(b * Q8_BLOCK / 2 + at) as *const __m128i);
                _mm256_cvtepu8_epi32(raw)
            };
            let (first, second) = (bytes(0), bytes(8));
            let w0 = _mm256_cvtepi32_ps(_mm256_and_si256(first, mask)); // elements 0..8
            let w1 = _mm256_cvtepi32_ps(_mm256_and_si256(second, mask)); // 8..16
            let w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(first, 4)); // 16..24
            let w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(second, 4)); // 24..32
            let sv = _mm256_set1_ps(*scale);
            for k in 0..N {
                let xp = xs[k].as_ptr().add(b * Q8_BLOCK);
                let even = _mm256_mul_ps(w0, _mm256_loadu_ps(xp));
                let odd = _mm256_mul_ps(w1, _mm256_loadu_ps(xp.add(8)));
                let even = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp.add(16)), even);
                let odd = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp.add(24)), odd);
                acc[k] = _mm256_fmadd_ps(_mm256_add_ps(even, odd), sv, acc[k]);
                offset[k] += min * xsums[k].get_unchecked(b);
            }
        }
        let mut out = [0.0f32; N];
        for k in 0..N {
            out[k] = hsum(acc[k]) + offset[k];
        }
        out
    }
}

/// The weights as this backend will compute with them, back in f32: every
/// matrix the backend stores as Q8 is quantized and dequantized, everything
/// else is unchanged. A reference forward over these weights matches the
/// backend up to f32 rounding.
pub fn dequantized_weights(weights: &Weights, storage: WeightStorage) -> Weights {
    let round_trip = |t: &Tensor| -> Tensor {
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let m = Matrix::new(rows, cols, &t.data, storage);
        let mut data = vec![0.0; rows * cols];
        for (r, out) in data.chunks_mut(cols).enumerate() {
            m.row_into(r, out);
        }
        Tensor::new(t.shape.clone(), data)
    };
    weights.map_matrices(round_trip)
}

struct CpuLayer {
    attn_norm: Vec<f32>,
    /// Q, K and V projections stacked: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    wqkv: Matrix,
    bqkv: Option<Vec<f32>>,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    /// Gate and up projections stacked: `[2 * intermediate, hidden]`.
    w_gate_up: Matrix,
    w_down: Matrix,
}

struct KvPool {
    block_size: usize,
    num_blocks: usize,
    /// Per layer, `[num_blocks * block_size, kv_heads, head_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Per-step buffers, grown as needed and reused so steady-state decode does
/// not allocate.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
    positions: Vec<usize>,
    slots: Vec<usize>,
    last_rows: Vec<f32>,
    sink_k: Vec<f32>,
    sink_v: Vec<f32>,
}

fn resize(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

pub struct CpuBackend {
    cfg: ModelConfig,
    kernel: Kernel,
    /// `Some`: activations rounded to bf16 where a GPU backend rounds them
    /// (for checking that backend token for token); `None`: f32 throughout.
    bf16_activations: Option<Bf16Activations>,
    embed: Matrix,
    /// `None`: tied to `embed`.
    lm_head: Option<Matrix>,
    layers: Vec<CpuLayer>,
    final_norm: Vec<f32>,
    /// RoPE inverse frequencies (llama3 scaling applied), `[head_dim / 2]`.
    inv_freq: Vec<f32>,
    kv: Option<KvPool>,
    scratch: Scratch,
}

/// Where a GPU backend rounds activations to bf16, for the CPU backend to do
/// the same ([`CpuBackend::set_bf16_activations`]): with the same bf16 weights
/// it computes the GPU's function up to the order of f32 sums, which shows
/// how much of the GPU's distance from f32 the bf16 design itself causes.
/// (It does not make the two agree bit for bit: on the default model, two
/// such CPU runs differing only in SIMD summation order already end
/// 0.7–1.9e-2 apart, as each changed rounding grows through the layers.)
///
/// Always rounded: each RMSNorm's output (a matrix input), K and V (the
/// cache), the attention output and the SiLU·mul product (matrix inputs).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bf16Activations {
    /// Whether steps round the MLP's gate and up products to bf16 (a GEMM's
    /// bf16 output) before SiLU·mul...
    pub bf16_gate_up: bool,
    /// ...except steps of these sizes (total tokens), which keep them in f32
    /// (a fused matrix-vector path).
    pub f32_gate_up_tokens: Vec<usize>,
    /// Steps that are not all single-token decodes round the scaled query
    /// and the softmax weights multiplying V to bf16 (tensor-core prefill
    /// attention; the normaliser stays f32). Decode attention stays f32.
    pub bf16_prefill_attention: bool,
}

fn round_bf16(v: &mut [f32]) {
    for x in v {
        *x = half::bf16::from_f32(*x).to_f32();
    }
}

/// RoPE inverse frequencies, with Llama 3 frequency scaling when configured.
pub(crate) fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let half = cfg.head_dim / 2;
    (0..half)
        .map(|i| {
            let freq = 1.0 / (cfg.rope_theta as f64).powf(2.0 * i as f64 / cfg.head_dim as f64);
            let Some(s) = cfg.rope_scaling else {
                return freq as f32;
            };
            let old_len = s.original_max_position_embeddings as f64;
            let low_wavelen = old_len / s.low_freq_factor as f64;
            let high_wavelen = old_len / s.high_freq_factor as f64;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let scaled = if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / s.factor as f64
            } else {
                let smooth = (old_len / wavelen - s.low_freq_factor as f64)
                    / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
                (1.0 - smooth) * freq / s.factor as f64 + smooth * freq
            };
            scaled as f32
        })
        .collect()
}

impl CpuBackend {
    /// Converts `weights` (HF layout, f32) to this backend's storage.
    pub fn new(
        cfg: ModelConfig,
        weights: &Weights,
        storage: WeightStorage,
    ) -> Result<Self, BackendError> {
        let h = cfg.hidden_size;
        let q_dim = cfg.num_heads * cfg.head_dim;
        let kv_dim = cfg.num_kv_heads * cfg.head_dim;
        let f = cfg.intermediate_size;
        if !cfg.head_dim.is_multiple_of(2)
            || cfg.head_dim > 512
            || cfg.num_kv_heads == 0
            || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
        {
            return Err(BackendError::Weights(format!(
                "unsupported attention geometry: {} heads, {} kv heads, head_dim {}",
                cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            )));
        }
        check_weights(&cfg, weights)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in &weights.layers {
            let bqkv = match (&l.bq, &l.bk, &l.bv) {
                (Some(bq), Some(bk), Some(bv)) => Some([&bq.data[..], &bk.data, &bv.data].concat()),
                _ => None,
            };
            let qkv = [&l.wq.data[..], &l.wk.data, &l.wv.data].concat();
            let gate_up = [&l.w_gate.data[..], &l.w_up.data].concat();
            layers.push(CpuLayer {
                attn_norm: l.attn_norm.data.clone(),
                wqkv: Matrix::new(q_dim + 2 * kv_dim, h, &qkv, storage),
                bqkv,
                wo: Matrix::new(h, q_dim, &l.wo.data, storage),
                ffn_norm: l.ffn_norm.data.clone(),
                w_gate_up: Matrix::new(2 * f, h, &gate_up, storage),
                w_down: Matrix::new(h, f, &l.w_down.data, storage),
            });
        }
        Ok(Self {
            kernel: Kernel::detect(),
            bf16_activations: None,
            embed: Matrix::new(cfg.vocab_size, h, &weights.embed_tokens.data, storage),
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|t| Matrix::new(cfg.vocab_size, h, &t.data, storage)),
            layers,
            final_norm: weights.final_norm.data.clone(),
            inv_freq: rope_inv_freq(&cfg),
            kv: None,
            scratch: Scratch::default(),
            cfg,
        })
    }

    /// Rounds activations to bf16 where a GPU backend does (`Some`), or keeps
    /// them f32 (`None`, the default and what serving uses).
    pub fn set_bf16_activations(&mut self, rounding: Option<Bf16Activations>) {
        self.bf16_activations = rounding;
    }

    /// How many matrices use each storage, e.g. `q4 x 210, q8 x 1`.
    pub fn storage_summary(&self) -> String {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        let matrices = self
            .layers
            .iter()
            .flat_map(|l| [&l.wqkv, &l.wo, &l.w_gate_up, &l.w_down])
            .chain(std::iter::once(&self.embed))
            .chain(self.lm_head.as_ref());
        for m in matrices {
            match counts.iter_mut().find(|(n, _)| *n == m.storage_name()) {
                Some((_, c)) => *c += 1,
                None => counts.push((m.storage_name(), 1)),
            }
        }
        counts
            .iter()
            .map(|(n, c)| format!("{n} x {c}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The SIMD kernel in use (`portable`, `avx2`).
    pub fn kernel_name(&self) -> &'static str {
        self.kernel.name()
    }

    /// Bytes the weights occupy in this backend's storage.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.wqkv.bytes()
                    + l.wo.bytes()
                    + l.w_gate_up.bytes()
                    + l.w_down.bytes()
                    + 4 * (l.attn_norm.len()
                        + l.ffn_norm.len()
                        + l.bqkv.as_ref().map_or(0, |b| b.len()))
            })
            .sum();
        layers + self.embed.bytes() + self.lm_head.as_ref().map_or(0, |m| m.bytes())
    }

    fn pool(&self) -> Result<&KvPool, BackendError> {
        self.kv.as_ref().ok_or(BackendError::KvCacheNotInitialised)
    }

    fn slot(pool: &KvPool, block_ids: &[u32], pos: usize) -> Result<usize, BackendError> {
        let block =
            *block_ids
                .get(pos / pool.block_size)
                .ok_or(BackendError::BlockTableTooShort {
                    blocks: block_ids.len(),
                    tokens: pos + 1,
                    block_size: pool.block_size,
                })?;
        if block as usize >= pool.num_blocks {
            return Err(BackendError::BlockOutOfRange {
                block,
                num_blocks: pool.num_blocks,
            });
        }
        Ok(block as usize * pool.block_size + pos % pool.block_size)
    }
}

/// Below this many elements, a row-wise pass runs on the calling thread: a
/// parallel dispatch is a synchronisation point, which costs more than the
/// work for decode-sized steps (and much more when the cores are contended).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// Applies `f(row_index, out_row, in_row)` to rows of `width`, in parallel
/// only when the work is large enough to pay for it.
fn for_rows<F>(out: &mut [f32], out_width: usize, input: &[f32], in_width: usize, f: F)
where
    F: Fn(usize, &mut [f32], &[f32]) + Sync,
{
    if out.len() + input.len() < PARALLEL_MIN_ELEMENTS {
        out.chunks_mut(out_width)
            .zip(input.chunks(in_width))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, o, x));
    } else {
        out.par_chunks_mut(out_width)
            .zip(input.par_chunks(in_width))
            .enumerate()
            .for_each(|(i, (o, x))| f(i, o, x));
    }
}

/// [`for_rows`] over one buffer modified in place.
fn for_rows_mut<F>(buf: &mut [f32], width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    if buf.len() < PARALLEL_MIN_ELEMENTS {
        buf.chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        buf.par_chunks_mut(width)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    }
}

fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let h = weight.len();
    for_rows(out, h, x, h, |_, o, x| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, x), w) in o.iter_mut().zip(x).zip(weight) {
            *o = x * inv * w;
        }
    });
}

/// Rotates pairs `(i, i + d/2)` of every head in `v` (HF half-split RoPE).
fn apply_rope(v: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in v.chunks_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

impl ComputeBackend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn kv_bytes_per_token(&self) -> usize {
        self.cfg.kv_bytes_per_token(std::mem::size_of::<f32>())
    }

    fn init_kv_cache(&mut self, block_size: usize, num_blocks: usize) -> Result<(), BackendError> {
        check_kv_geometry(block_size, num_blocks)?;
        let per_layer = num_blocks * block_size * self.cfg.num_kv_heads * self.cfg.head_dim;
        let layers = self.cfg.num_layers;
        self.kv = Some(KvPool {
            block_size,
            num_blocks,
            k: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
            v: (0..layers).map(|_| vec![0.0; per_layer]).collect(),
        });
        Ok(())
    }

    fn forward(
        &mut self,
        batch: &[SeqInput<'_>],
        logits: &mut Vec<f32>,
        mut sink: Option<&mut dyn KvLayerSink>,
    ) -> Result<(), BackendError> {
        let cfg = &self.cfg;
        let kernel = self.kernel;
        let (h, hd, nh, nkv) = (
            cfg.hidden_size,
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
        );
        let (q_dim, kv_dim, f) = (nh * hd, nkv * hd, cfg.intermediate_size);
        let qkv_dim = q_dim + 2 * kv_dim;
        let pool = self
            .kv
            .as_mut()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        let s = &mut self.scratch;

        // Validate everything before touching the cache, and resolve each new
        // token's position and cache slot once for all layers.
        s.positions.clear();
        s.slots.clear();
        for seq in batch {
            for (i, &tok) in seq.tokens.iter().enumerate() {
                check_token(cfg, tok)?;
                let pos = seq.start_pos + i;
                s.positions.push(pos);
                s.slots.push(CpuBackend::slot(pool, seq.block_table, pos)?);
            }
        }
        let total = s.positions.len();
        resize(&mut s.x, total * h);
        for (row, &tok) in
            s.x.chunks_mut(h)
                .zip(batch.iter().flat_map(|seq| seq.tokens))
        {
            self.embed.row_into(tok as usize, row);
        }
        resize(&mut s.normed, total * h);
        resize(&mut s.qkv, total * qkv_dim);
        resize(&mut s.attn, total * q_dim);
        resize(&mut s.proj, total * h);
        resize(&mut s.gate_up, total * 2 * f);
        resize(&mut s.act, total * f);

        // Sequence boundaries within the flattened token rows.
        let mut seq_offsets = Vec::with_capacity(batch.len() + 1);
        seq_offsets.push(0);
        for seq in batch {
            seq_offsets.push(seq_offsets.last().unwrap() + seq.tokens.len());
        }

        let scale = 1.0 / (hd as f32).sqrt();
        let group = nh / nkv;
        let row_width = nkv * hd;
        let half = hd / 2;
        // The GPU rounding this step mirrors, if any (see Bf16Activations).
        let emulate = self.bf16_activations.as_ref();
        let round = |v: &mut [f32]| {
            if emulate.is_some() {
                round_bf16(v)
            }
        };
        let all_decode = batch.iter().all(|seq| seq.tokens.len() == 1);
        let bf16_attention = emulate.is_some_and(|e| e.bf16_prefill_attention) && !all_decode;
        let bf16_gate_up =
            emulate.is_some_and(|e| e.bf16_gate_up && !e.f32_gate_up_tokens.contains(&total));
        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, cfg.rms_norm_eps, &mut s.normed);
            round(&mut s.normed);
            layer.wqkv.matmul(kernel, &s.normed, total, &mut s.qkv);
            let inv_freq = &self.inv_freq;
            let positions = &s.positions;
            for_rows_mut(&mut s.qkv, qkv_dim, |t, row| {
                if let Some(b) = &layer.bqkv {
                    for (v, b) in row.iter_mut().zip(b) {
                        *v += b;
                    }
                }
                let mut cos = [0f32; 256];
                let mut sin = [0f32; 256];
                let pos = positions[t] as f32;
                for i in 0..half {
                    let (sn, cs) = (pos * inv_freq[i]).sin_cos();
                    cos[i] = cs;
                    sin[i] = sn;
                }
                apply_rope(&mut row[..q_dim + kv_dim], hd, &cos[..half], &sin[..half]);
                if emulate.is_some() {
                    round_bf16(&mut row[q_dim..]);
                }
                if bf16_attention {
                    // The kernel rounds the query after scaling it.
                    for q in &mut row[..q_dim] {
                        *q = half::bf16::from_f32(*q * scale).to_f32() / scale;
                    }
                }
            });
            let (kc, vc) = (&mut pool.k[li], &mut pool.v[li]);
            for (t, &slot) in s.slots.iter().enumerate() {
                let row = &s.qkv[t * qkv_dim..(t + 1) * qkv_dim];
                kc[slot * row_width..(slot + 1) * row_width]
                    .copy_from_slice(&row[q_dim..q_dim + kv_dim]);
                vc[slot * row_width..(slot + 1) * row_width]
                    .copy_from_slice(&row[q_dim + kv_dim..]);
            }

            // Causal attention over the paged cache, one task per (sequence, head).
            let (kc, vc) = (&pool.k[li][..], &pool.v[li][..]);
            let qkv = &s.qkv;
            let attn_ptr = SharedMut(s.attn.as_mut_ptr());
            let block_size = pool.block_size;
            let attend = |task: usize| {
                let (si, head) = (task / nh, task % nh);
                let seq = &batch[si];
                let kvh = head / group;
                let ctx = seq.start_pos + seq.tokens.len();
                let mut scores = vec![0f32; ctx];
                let mut out = vec![0f32; hd];
                for i in 0..seq.tokens.len() {
                    let t = seq_offsets[si] + i;
                    let q = &qkv[t * qkv_dim + head * hd..t * qkv_dim + (head + 1) * hd];
                    let n = seq.start_pos + i + 1;
                    let mut max = f32::NEG_INFINITY;
                    for (pos, sc) in scores[..n].iter_mut().enumerate() {
                        let slot = seq.block_table[pos / block_size] as usize * block_size
                            + pos % block_size;
                        let off = slot * row_width + kvh * hd;
                        *sc = dot(kernel, q, &kc[off..off + hd]) * scale;
                        max = max.max(*sc);
                    }
                    let mut sum = 0.0;
                    for sc in &mut scores[..n] {
                        *sc = (*sc - max).exp();
                        sum += *sc;
                    }
                    out.fill(0.0);
                    for (pos, sc) in scores[..n].iter().enumerate() {
                        let slot = seq.block_table[pos / block_size] as usize * block_size
                            + pos % block_size;
                        let off = slot * row_width + kvh * hd;
                        let weight = if bf16_attention {
                            half::bf16::from_f32(*sc).to_f32()
                        } else {
                            *sc
                        };
                        axpy(kernel, weight / sum, &vc[off..off + hd], &mut out);
                    }
                    // SAFETY: task (si, head) alone writes head `head` of its own
                    // tokens' rows; the buffer outlives the parallel loop.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            attn_ptr.get().add(t * q_dim + head * hd),
                            hd,
                        )
                    };
                    dst.copy_from_slice(&out);
                }
            };
            // Multiply-adds of this layer's attention: small decode steps run
            // on this thread rather than pay for a parallel dispatch.
            let work: usize = batch
                .iter()
                .map(|q| q.tokens.len() * (q.start_pos + q.tokens.len()) * nh * hd)
                .sum();
            if work < 8 * PARALLEL_MIN_ELEMENTS {
                (0..batch.len() * nh).for_each(attend);
            } else {
                (0..batch.len() * nh).into_par_iter().for_each(attend);
            }

            round(&mut s.attn);
            layer.wo.matmul(kernel, &s.attn, total, &mut s.proj);
            s.x.iter_mut().zip(&s.proj).for_each(|(x, p)| *x += p);
            rms_norm(&s.x, &layer.ffn_norm, cfg.rms_norm_eps, &mut s.normed);
            round(&mut s.normed);
            layer
                .w_gate_up
                .matmul(kernel, &s.normed, total, &mut s.gate_up);
            if bf16_gate_up {
                round_bf16(&mut s.gate_up);
            }
            for_rows(&mut s.act, f, &s.gate_up, 2 * f, |_, a, gu| {
                let (g, u) = gu.split_at(f);
                for ((a, g), u) in a.iter_mut().zip(g).zip(u) {
                    *a = g / (1.0 + (-g).exp()) * u;
                }
            });
            round(&mut s.act);
            layer.w_down.matmul(kernel, &s.act, total, &mut s.proj);
            s.x.iter_mut().zip(&s.proj).for_each(|(x, p)| *x += p);

            if let Some(sink) = sink.as_deref_mut() {
                for (si, seq) in batch.iter().enumerate() {
                    s.sink_k.clear();
                    s.sink_v.clear();
                    for t in seq_offsets[si]..seq_offsets[si] + seq.tokens.len() {
                        let row = &s.qkv[t * qkv_dim..(t + 1) * qkv_dim];
                        s.sink_k.extend_from_slice(&row[q_dim..q_dim + kv_dim]);
                        s.sink_v.extend_from_slice(&row[q_dim + kv_dim..]);
                    }
                    sink.layer_computed(li, si, &s.sink_k, &s.sink_v);
                }
            }
        }

        // Only the last token of sequences that asked for logits goes through
        // the (large) output projection.
        let mut last_rows = std::mem::take(&mut s.last_rows);
        last_rows.clear();
        for (si, seq) in batch.iter().enumerate() {
            if seq.need_logits && !seq.tokens.is_empty() {
                let t = seq_offsets[si + 1] - 1;
                last_rows.extend_from_slice(&s.x[t * h..(t + 1) * h]);
            }
        }
        let n_rows = last_rows.len() / h;
        resize(&mut s.normed, n_rows * h);
        rms_norm(
            &last_rows,
            &self.final_norm,
            cfg.rms_norm_eps,
            &mut s.normed,
        );
        if self.bf16_activations.is_some() {
            round_bf16(&mut s.normed);
        }
        resize(logits, n_rows * cfg.vocab_size);
        self.lm_head
            .as_ref()
            .unwrap_or(&self.embed)
            .matmul(kernel, &s.normed, n_rows, logits);
        s.last_rows = last_rows;
        Ok(())
    }

    fn read_kv(&self, block_ids: &[u32], num_tokens: usize) -> Result<KvExport, BackendError> {
        let pool = self.pool()?;
        let w = self.cfg.num_kv_heads * self.cfg.head_dim;
        let slots = (0..num_tokens)
            .map(|p| CpuBackend::slot(pool, block_ids, p))
            .collect::<Result<Vec<_>, _>>()?;
        let gather = |cache: &[f32]| {
            let mut out = Vec::with_capacity(num_tokens * w);
            for &s in &slots {
                out.extend_from_slice(&cache[s * w..(s + 1) * w]);
            }
            out
        };
        Ok(KvExport {
            dtype: KvDtype::F32,
            num_tokens,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            layers: pool
                .k
                .iter()
                .zip(&pool.v)
                .map(|(k, v)| (gather(k), gather(v)))
                .collect(),
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
        let pool = self
            .kv
            .as_mut()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        for i in 0..k.len() / w {
            let s = CpuBackend::slot(pool, block_ids, start_pos + i)?;
            pool.k[layer][s * w..(s + 1) * w].copy_from_slice(&k[i * w..(i + 1) * w]);
            pool.v[layer][s * w..(s + 1) * w].copy_from_slice(&v[i * w..(i + 1) * w]);
        }
        Ok(())
    }

    fn copy_block(&mut self, src: u32, dst: u32) -> Result<(), BackendError> {
        let pool = self
            .kv
            .as_mut()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        check_blocks_in_pool(&[src, dst], pool.num_blocks)?;
        let n = pool.block_size * self.cfg.num_kv_heads * self.cfg.head_dim;
        let (s, d) = (src as usize * n, dst as usize * n);
        for cache in pool.k.iter_mut().chain(pool.v.iter_mut()) {
            cache.copy_within(s..s + n, d);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the CPU offers computes the same dot products as the
    /// portable one, for f32 and Q8 rows and 1 to 4 activation rows.
    /// Weights on a Q4 grid: per block of 32, `scale * level + min`.
    fn q4_grid(rows: usize, cols: usize) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| {
                let block = i / Q8_BLOCK;
                let (scale, min) = (0.01 + block as f32 * 0.003, -0.07 * (block % 5) as f32);
                // Every block uses levels 0 and 15, like a real Q4_1 tensor.
                let level = match i % Q8_BLOCK {
                    0 => 0,
                    1 => 15,
                    j => (j * 7 + block) % 16,
                };
                scale * level as f32 + min
            })
            .collect()
    }

    #[test]
    fn compact_storage_packs_q4_grids_losslessly_and_falls_back_to_q8() {
        let (rows, cols) = (2, 64);
        let grid = q4_grid(rows, cols);
        let m = Matrix::new(rows, cols, &grid, WeightStorage::Compact);
        assert_eq!(m.storage_name(), "q4");
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            m.row_into(r, &mut row);
            for (got, want) in row.iter().zip(&grid[r * cols..]) {
                assert!((got - want).abs() <= 1e-6, "{got} vs {want}");
            }
        }
        let mut off_grid = grid.clone();
        off_grid[70] += 0.001;
        let m = Matrix::new(rows, cols, &off_grid, WeightStorage::Compact);
        assert_eq!(m.storage_name(), "q8", "one block off the grid keeps Q8");
    }

    #[test]
    fn every_available_kernel_agrees_with_the_portable_one() {
        let (rows, cols) = (3, 96);
        let smooth: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        let grid = q4_grid(rows, cols);
        // 21 rows: the grouped kernels and the prefill path, with remainders.
        let x: Vec<f32> = (0..21 * cols)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 30.0)
            .collect();
        for (weights, storage) in [
            (&smooth, WeightStorage::F32),
            (&smooth, WeightStorage::Q8),
            (&grid, WeightStorage::Compact),
        ] {
            let m = Matrix::new(rows, cols, weights, storage);
            // The portable kernel itself against plain f32 dot products of
            // the stored (dequantized) rows.
            let mut dense = vec![0.0; rows * cols];
            for (r, out) in dense.chunks_mut(cols).enumerate() {
                m.row_into(r, out);
            }
            let mut want = vec![0.0; 21 * rows];
            m.matmul(Kernel::Portable, &x, 21, &mut want);
            for t in 0..21 {
                for r in 0..rows {
                    let plain: f32 = dense[r * cols..(r + 1) * cols]
                        .iter()
                        .zip(&x[t * cols..(t + 1) * cols])
                        .map(|(a, b)| a * b)
                        .sum();
                    let got = want[t * rows + r];
                    assert!(
                        (plain - got).abs() <= 1e-4 * plain.abs().max(1.0),
                        "portable {}: {got} vs {plain}",
                        m.storage_name()
                    );
                }
            }
            for kernel in Kernel::available() {
                for tokens in 1..=21 {
                    let mut got = vec![0.0; tokens * rows];
                    m.matmul(kernel, &x[..tokens * cols], tokens, &mut got);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                            "{kernel:?} {storage:?} with {tokens} rows: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    fn prompt_logits(cpu: &mut CpuBackend, tokens: &[u32], start_pos: usize) -> Vec<f32> {
        let table: Vec<u32> = (0..8).collect();
        let mut logits = Vec::new();
        cpu.forward(
            &[SeqInput {
                tokens,
                start_pos,
                block_table: &table,
                need_logits: true,
            }],
            &mut logits,
            None,
        )
        .unwrap();
        logits
    }

    /// Rounding like a GPU: the cache then holds only bf16 values, the
    /// logits move by about bf16's precision (not more, not zero), and the
    /// gate/up rounding applies exactly to the step sizes not listed as f32.
    #[test]
    fn bf16_activations_round_the_cache_and_move_logits_by_bf16_noise() {
        let cfg = tandem_model::testing::tiny_config(tandem_model::Architecture::Llama);
        let weights = tandem_model::testing::random_weights(&cfg, 11);
        let prompt: Vec<u32> = (0..9)
            .map(|i| (i * 7 + 3) % cfg.vocab_size as u32)
            .collect();
        let run = |rounding: Option<Bf16Activations>, tokens: &[u32]| {
            let mut cpu = CpuBackend::new(cfg.clone(), &weights, WeightStorage::F32).unwrap();
            cpu.init_kv_cache(4, 8).unwrap();
            cpu.set_bf16_activations(rounding);
            let mut logits = prompt_logits(&mut cpu, &prompt, 0);
            if !tokens.is_empty() {
                logits = prompt_logits(&mut cpu, tokens, prompt.len());
            }
            let kv = cpu.read_kv(&[0, 1, 2], prompt.len()).unwrap();
            (logits, kv)
        };
        let like_gpu = Bf16Activations {
            bf16_gate_up: true,
            f32_gate_up_tokens: vec![1],
            bf16_prefill_attention: true,
        };
        let (exact, kv_exact) = run(None, &[]);
        let (rounded, kv_rounded) = run(Some(like_gpu.clone()), &[]);
        let is_bf16 = |v: &f32| half::bf16::from_f32(*v).to_f32() == *v;
        assert!(
            kv_rounded
                .layers
                .iter()
                .all(|(k, v)| k.iter().chain(v).all(is_bf16)),
            "cache values are bf16"
        );
        assert!(
            !kv_exact.layers.iter().all(|(k, _)| k.iter().all(is_bf16)),
            "f32 activations are not rounded"
        );
        let rel = |a: &[f32], b: &[f32]| {
            let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
            let n: f32 = b.iter().map(|y| y * y).sum();
            (d / n).sqrt()
        };
        let err = rel(&rounded, &exact);
        assert!(err > 1e-5 && err < 3e-2, "relative error {err}");
        // A one-token step: listed as f32 gate/up or not changes the result.
        let (f32_mlp, _) = run(Some(like_gpu.clone()), &[5]);
        let (bf16_mlp, _) = run(
            Some(Bf16Activations {
                f32_gate_up_tokens: Vec::new(),
                ..like_gpu
            }),
            &[5],
        );
        assert_ne!(f32_mlp, bf16_mlp);
    }
}
