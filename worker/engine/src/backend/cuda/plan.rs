//! Step planning: what a batch becomes on the device before any kernel
//! runs. The batch is validated against the KV pool, its inputs (tokens,
//! positions, cache slots, prefill tiles, sampling rules, block tables) are
//! written to the pinned staging area in one layout ([`InputLayout`]), and
//! the step's shape is fixed: decode or prefill, its CUDA-graph bucket and
//! decode attention's splits (both functions of the batch alone, never of the
//! context, so a captured graph serves every context length).

use tandem_model::ModelConfig;

use super::kernels::decode_v2_index;
use super::launch::{Heads, PrefillKernel};
use super::tuning::KernelTuning;
use super::{CudaBackend, CudaError, CudaOptions, MAX_ATTENTION_SMEM};
use crate::backend::{check_token, BackendError, DeviceSampling, SeqInput};

/// Offsets (in i32 elements) of the step inputs inside one device buffer,
/// copied from pinned memory in one transfer per step.
#[derive(Debug, Clone, Copy)]
pub(super) struct InputLayout {
    pub max_tokens: usize,
    pub max_seqs: usize,
    pub max_tiles: usize,
    /// Block-table entries per sequence.
    pub max_blocks: usize,
    /// 32-bit words of one row's sampling rule (`SAMPLING_WORDS`).
    pub sampling_words: usize,
}

impl InputLayout {
    pub fn tokens(&self) -> usize {
        0
    }
    pub fn positions(&self) -> usize {
        self.max_tokens
    }
    pub fn slots(&self) -> usize {
        2 * self.max_tokens
    }
    pub fn logit_rows(&self) -> usize {
        3 * self.max_tokens
    }
    pub fn tile_seq(&self) -> usize {
        self.logit_rows() + self.max_seqs
    }
    pub fn tile_row0(&self) -> usize {
        self.tile_seq() + self.max_tiles
    }
    pub fn tile_rows(&self) -> usize {
        self.tile_row0() + self.max_tiles
    }
    /// `sampling_words` per output-head row: how `sample_rows` picks it.
    pub fn sampling(&self) -> usize {
        self.tile_rows() + self.max_tiles
    }
    pub fn block_tables(&self) -> usize {
        self.sampling() + self.sampling_words * self.max_seqs
    }
    pub fn len(&self) -> usize {
        self.block_tables() + self.max_seqs * self.max_blocks
    }
}

/// The host-side plan of one step, validated against the pool.
pub(super) struct StepPlan {
    pub tokens: usize,
    pub seqs: usize,
    pub decode: bool,
    /// Splits of decode attention (0 for prefill steps).
    pub splits: usize,
    pub logit_rows: Vec<usize>,
    pub tiles: usize,
    /// Row range of each sequence.
    pub seq_rows: Vec<(usize, usize)>,
}

/// Prefill tiles the input buffer has room for: every tiling has tiles of
/// at least `PF_Q` rows, plus a partial one per sequence.
pub(super) fn max_tiles(opts: &CudaOptions, t: &KernelTuning) -> usize {
    opts.max_batch_tokens / t.pf_q + opts.max_num_seqs
}

/// Splits of the older decode attention: every one the longest context may
/// need.
pub(super) fn max_splits(opts: &CudaOptions, t: &KernelTuning) -> usize {
    opts.max_model_len
        .div_ceil(t.decode_partition)
        .next_power_of_two()
}

/// The decode-attention grid's splits (its z dimension) for a step of `seqs`
/// sequences: a function of the batch alone, never of the context, so a
/// captured graph serves every context length. With the context-independent
/// kernel, as many splits as keep `seqs × kv_heads × splits` blocks within
/// one wave of one block per SM (its register use allows one; a block keeps
/// 32-64 KiB of loads in flight, enough to stream at full bandwidth), at least
/// one; a sequence uses fewer when its context is short (see
/// `DECODE_MIN_CHUNK`), the others returning at once. With the older kernel
/// (head dims it does not cover), every split the longest context may need,
/// the unused ones returning at once.
pub(super) fn decode_splits(
    cfg: &ModelConfig,
    opts: &CudaOptions,
    t: &KernelTuning,
    num_sms: u32,
    seqs: usize,
) -> usize {
    let group = cfg.num_heads / cfg.num_kv_heads.max(1);
    if decode_v2_index(cfg.head_dim, group).is_none() {
        return max_splits(opts, t);
    }
    let blocks_per_split = seqs.max(1) * cfg.num_kv_heads.max(1);
    (num_sms as usize / blocks_per_split)
        .clamp(1, opts.max_model_len.div_ceil(t.decode_min_chunk).max(1))
}

/// Partial results (rows of head_dim floats) decode attention may write in
/// one step: the most over every batch size of sequences × heads × splits.
pub(super) fn decode_part_rows(
    cfg: &ModelConfig,
    opts: &CudaOptions,
    t: &KernelTuning,
    num_sms: u32,
) -> usize {
    (1..=opts.max_num_seqs)
        .map(|n| n * cfg.num_heads * decode_splits(cfg, opts, t, num_sms, n))
        .max()
        .unwrap_or(0)
}

/// The CUDA graph a decode step of `seqs` sequences replays: its batch
/// bucket and decode attention's splits. Neither depends on the context.
pub(super) fn decode_graph_key(
    cfg: &ModelConfig,
    opts: &CudaOptions,
    t: &KernelTuning,
    num_sms: u32,
    seqs: usize,
    max_seqs: usize,
) -> (usize, usize) {
    let bucket = graph_bucket(seqs, max_seqs);
    (bucket, decode_splits(cfg, opts, t, num_sms, bucket))
}

/// The batch size a decode step of `seqs` sequences is padded to: powers of
/// two up to the planned maximum, so a handful of graphs serve every size.
pub(super) fn graph_bucket(seqs: usize, max_seqs: usize) -> usize {
    seqs.next_power_of_two().min(max_seqs)
}

/// Whether prefill attention runs on tensor cores (head_dim 64 or 128).
pub(super) fn tensor_core_prefill(cfg: &ModelConfig) -> bool {
    matches!(cfg.head_dim, 64 | 128)
}

/// The prefill kernel for `cfg`: wgmma where it may run (`wgmma`: compiled,
/// for `sm_90a`, and not switched off by `TANDEM_CUDA_WGMMA`), the head dim
/// is 64 or 128 and the GQA group is even (two heads a block); else mma.sync
/// for head dims 64 and 128; else the scalar kernel.
pub(super) fn prefill_kernel(cfg: &ModelConfig, wgmma: bool) -> PrefillKernel {
    let group = cfg.num_heads / cfg.num_kv_heads.max(1);
    if !tensor_core_prefill(cfg) {
        PrefillKernel::Scalar
    } else if wgmma && group.is_multiple_of(2) {
        PrefillKernel::Wgmma
    } else {
        PrefillKernel::TensorCore
    }
}

/// Checks that the kernels handle `cfg`'s attention and MLP shapes.
pub(super) fn check_geometry(cfg: &ModelConfig, t: &KernelTuning) -> Result<(), CudaError> {
    let group = cfg.num_heads / cfg.num_kv_heads.max(1);
    if cfg.num_kv_heads == 0
        || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
        || group > t.max_group
        || !cfg.head_dim.is_multiple_of(32)
        || cfg.head_dim > t.max_head_dim
        || !cfg.intermediate_size.is_multiple_of(8)
    {
        return Err(CudaError::Unsupported(format!(
            "attention geometry {} heads / {} kv heads / head_dim {} with intermediate {}: \
             the kernels need head_dim a multiple of 32 up to {}, at most {} query heads \
             per KV head and an intermediate size divisible by 8",
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.intermediate_size,
            t.max_head_dim,
            t.max_group
        )));
    }
    // The wgmma kernel needs less than the mma.sync one it replaces.
    let smem = prefill_kernel(cfg, false).smem(Heads::of(cfg), t);
    if smem > MAX_ATTENTION_SMEM as usize {
        return Err(CudaError::Unsupported(format!(
            "head_dim {} needs {smem} bytes of shared memory",
            cfg.head_dim
        )));
    }
    Ok(())
}

impl CudaBackend {
    /// Validates the batch and writes its inputs to the pinned staging area;
    /// with `allow_graph`, a decode step is padded to its graph bucket.
    pub(super) fn plan(
        &mut self,
        batch: &[SeqInput<'_>],
        allow_graph: bool,
        sampling: Option<&[DeviceSampling]>,
    ) -> Result<(StepPlan, Option<usize>), BackendError> {
        let cfg = &self.cfg;
        let opts = &self.opts;
        let tuning = &self.gpu.tuning;
        let num_sms = self.gpu.num_sms;
        let pool = self
            .kv
            .as_mut()
            .ok_or(BackendError::KvCacheNotInitialised)?;
        let layout = pool.layout;
        let words_per_row = layout.sampling_words;
        let tokens: usize = batch.iter().map(|s| s.tokens.len()).sum();
        let decode = !batch.is_empty() && batch.iter().all(|s| s.tokens.len() == 1);
        let tile_len = self.prefill.tile(Heads::of(cfg), tuning);
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
                tuning,
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
                check_token(cfg, tok)?;
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
        let words = &mut host[layout.sampling()..][..words_per_row * layout.max_seqs];
        let greedy = DeviceSampling::GREEDY.to_words();
        for r in 0..n_logits {
            words[r * words_per_row..][..words_per_row].copy_from_slice(&greedy);
        }
        for (i, rule) in sampling.unwrap_or_default().iter().enumerate() {
            let head_row = if bucket.is_some() { logit_rows[i] } else { i };
            words[head_row * words_per_row..][..words_per_row].copy_from_slice(&rule.to_words());
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
    pub(super) fn upload_inputs(&self, seqs: usize) -> Result<(), BackendError> {
        let pool = self.pool()?;
        let n = pool.layout.block_tables() + seqs * pool.layout.max_blocks;
        let host: &[i32] = pool.host_inputs.as_slice(n);
        self.gpu.copy_to(&pool.inputs, 0, host)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let t = KernelTuning::default();
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
                keys.insert(decode_graph_key(
                    &cfg,
                    &opts,
                    &t,
                    132,
                    seqs,
                    opts.max_num_seqs,
                ));
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
        let t = KernelTuning::default();
        let num_sms = 132;
        for (shape, max_model_len) in [("llama3-8b", 8192), ("smollm2-135m", 4096)] {
            let cfg = tandem_model::dummy::config(shape).unwrap();
            let opts = CudaOptions {
                max_num_seqs: 96,
                max_model_len,
                ..CudaOptions::default()
            };
            let rows = decode_part_rows(&cfg, &opts, &t, num_sms);
            let most = max_model_len / t.decode_min_chunk;
            for seqs in 1..=opts.max_num_seqs {
                let splits = decode_splits(&cfg, &opts, &t, num_sms, seqs);
                assert!(splits >= 1 && splits <= most);
                let per_split = seqs * cfg.num_kv_heads;
                let blocks = per_split * splits;
                let sms = num_sms as usize;
                assert!(
                    (blocks <= sms || splits == 1) && (blocks + per_split > sms || splits == most),
                    "{shape}: {seqs} sequences get {splits} splits, {blocks} blocks"
                );
                assert!(seqs * cfg.num_heads * splits <= rows);
            }
            // The largest batch runs one split a sequence: short steps.
            assert_eq!(decode_splits(&cfg, &opts, &t, num_sms, 96), 1, "{shape}");
        }
        // Head dims the new kernel does not cover keep the older kernel's
        // splits: every one the longest context needs.
        let mut cfg = tandem_model::dummy::config("smollm2-135m").unwrap();
        cfg.head_dim = 96;
        let opts = CudaOptions::default();
        assert_eq!(
            decode_splits(&cfg, &opts, &t, num_sms, 5),
            max_splits(&opts, &t)
        );
        assert_eq!(decode_splits(&cfg, &opts, &t, num_sms, 5), 64);
    }

    #[test]
    fn input_sections_do_not_overlap() {
        let l = InputLayout {
            max_tokens: 100,
            max_seqs: 7,
            max_tiles: 13,
            max_blocks: 5,
            sampling_words: 5,
        };
        let starts = [
            (l.tokens(), l.max_tokens),
            (l.positions(), l.max_tokens),
            (l.slots(), l.max_tokens),
            (l.logit_rows(), l.max_seqs),
            (l.tile_seq(), l.max_tiles),
            (l.tile_row0(), l.max_tiles),
            (l.tile_rows(), l.max_tiles),
            (l.sampling(), l.sampling_words * l.max_seqs),
            (l.block_tables(), l.max_seqs * l.max_blocks),
        ];
        for w in starts.windows(2) {
            assert_eq!(w[0].0 + w[0].1, w[1].0);
        }
        assert_eq!(l.len(), l.block_tables() + 35);
    }

    /// The words the kernel reads per sampling rule are the words the host
    /// writes.
    #[test]
    fn a_sampling_rule_is_the_kernels_number_of_words() {
        assert_eq!(
            DeviceSampling::GREEDY.to_words().len(),
            KernelTuning::default().sampling_words
        );
    }

    #[test]
    fn prefill_kernel_follows_head_dim_group_and_architecture() {
        let t = KernelTuning::default();
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
        let heads = Heads::of(&llama);
        assert_eq!(PrefillKernel::Wgmma.tile(heads, &t), 64);
        assert_eq!(PrefillKernel::Wgmma.block(heads, &t), (256, 16));
        assert_eq!(PrefillKernel::TensorCore.block(heads, &t), (256, 8));
        assert_eq!(PrefillKernel::Scalar.block(heads, &t), (128, 32));
        assert_eq!(PrefillKernel::Wgmma.smem(heads, &t), 96 * 1024 + 32);
        assert!(PrefillKernel::Wgmma.smem(heads, &t) < PrefillKernel::TensorCore.smem(heads, &t));
        // WG_MIN_BLOCKS blocks fit an SM (228 KiB on Hopper).
        assert!(t.wg_min_blocks * PrefillKernel::Wgmma.smem(heads, &t) <= 227 * 1024);
        // Every tiling fits the planned tile count (made for PF_Q-row tiles).
        for kernel in [
            PrefillKernel::Wgmma,
            PrefillKernel::TensorCore,
            PrefillKernel::Scalar,
        ] {
            assert!(kernel.tile(heads, &t) >= t.pf_q);
        }
    }

    #[test]
    fn unsupported_geometries_are_refused_with_the_reason() {
        let mut cfg = tandem_model::testing::tiny_config(tandem_model::Architecture::Llama);
        cfg.head_dim = 48;
        let err = check_geometry(&cfg, &KernelTuning::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("head_dim 48"), "{err}");
    }
}
