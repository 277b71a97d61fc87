//! GPU benchmarks of the CUDA backend with dummy weights (`tandem gpu bench`):
//! decode ms/token against the memory-bandwidth floor, prefill time and MFU.

use std::time::Instant;

use serde::Serialize;

use super::check::pseudo_tokens;
use crate::backend::cuda::{CudaBackend, CudaOptions, GemmResult};
use crate::backend::{BackendError, ComputeBackend, DeviceSampling, SeqInput};
use tandem_model::{dummy, ModelConfig};

/// Memory bandwidth the decode floor assumes (H100 SXM device copies measured
/// at about 3.0 TB/s).
pub const FLOOR_BANDWIDTH: f64 = 3.0e12;
/// Dense bf16 GEMM throughput measured with cuBLAS on the H100 (8192³).
pub const MEASURED_PEAK_FLOPS: f64 = 790e12;

const BLOCK: usize = 16;

#[derive(Debug, Clone, Serialize)]
pub struct DecodeResult {
    pub shape: String,
    pub batch: usize,
    pub context: usize,
    pub steps: usize,
    /// Median wall time of one step (host and device, token ids copied back).
    pub ms_per_step: f64,
    /// (weights + KV read per step) / FLOOR_BANDWIDTH.
    pub floor_ms: f64,
    /// floor_ms / ms_per_step.
    pub fraction_of_floor: f64,
    pub tokens_per_s: f64,
    /// Device time of one step: the last step's CUDA graph replayed back to
    /// back (`None` without graphs). `ms_per_step` minus this is the host's
    /// share: inputs, launch latency, copying the tokens back.
    pub graph_ms: Option<f64>,
    /// CUDA graphs captured during this run (prompt, warm-up and timed
    /// steps): one per batch bucket not seen before, never one per context.
    pub graph_captures: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillResult {
    pub shape: String,
    pub tokens: usize,
    pub ms: f64,
    /// Model FLOPs (2 x params x tokens + causal attention) per second over
    /// MEASURED_PEAK_FLOPS.
    pub mfu_vs_790: f64,
}

pub(super) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A dummy-weight backend of a named shape, sized for the benchmarks.
pub fn backend(
    ordinal: usize,
    shape: &str,
    max_batch_tokens: usize,
    max_num_seqs: usize,
    num_blocks: usize,
) -> Result<CudaBackend, String> {
    let cfg = dummy::config(shape).map_err(|e| e.to_string())?;
    let opts = CudaOptions {
        max_batch_tokens,
        max_num_seqs,
        max_model_len: 8192,
        gpu_memory_utilization: 0.95,
        cuda_graphs: true,
        tensor_parallel_size: 1,
    };
    let mut b = CudaBackend::new_dummy(ordinal, cfg, 1, opts).map_err(|e| e.to_string())?;
    b.init_kv_cache(BLOCK, num_blocks)
        .map_err(|e| e.to_string())?;
    Ok(b)
}

/// Bytes a decode step must read: every weight except the embedding table
/// (only the batch's rows; unless it doubles as the output head), plus the
/// KV cache of every sequence's context.
fn decode_bytes(cfg: &ModelConfig, weight_bytes: usize, kv_tokens: usize) -> f64 {
    let embed = if cfg.tie_word_embeddings {
        0
    } else {
        cfg.vocab_size * cfg.hidden_size * 2
    };
    (weight_bytes - embed) as f64 + (kv_tokens * cfg.kv_bytes_per_token(2)) as f64
}

/// A non-greedy rule for timing sampling on the device: temperature 0.8,
/// top-k 50, top-p 0.95 (every pass of the sampler runs).
pub const BENCH_SAMPLING: DeviceSampling = DeviceSampling {
    temperature: 0.8,
    top_k: 50,
    top_p: 0.95,
    uniform: 0.5,
};

/// Decode `steps` tokens for `batch` sequences after a `context`-token
/// prompt each; each step's tokens, picked on the device (greedy, or by
/// `sampling`), fed back.
pub fn decode(
    b: &mut CudaBackend,
    shape: &str,
    batch: usize,
    context: usize,
    steps: usize,
    sampling: Option<DeviceSampling>,
) -> Result<DecodeResult, BackendError> {
    let cfg = b.config().clone();
    let graphs_before = b.captured_graphs();
    let warmup = 8;
    let total = context + warmup + steps;
    let blocks_per_seq = total.div_ceil(BLOCK);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * blocks_per_seq) as u32..((s + 1) * blocks_per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| pseudo_tokens(context, cfg.vocab_size, s))
        .collect();
    // Prefill in groups that fit a step.
    let per_step = (4096 / context).max(1);
    let mut next: Vec<u32> = Vec::with_capacity(batch);
    for group in (0..batch).collect::<Vec<_>>().chunks(per_step) {
        let inputs: Vec<SeqInput<'_>> = group
            .iter()
            .map(|&s| SeqInput {
                tokens: &prompts[s],
                start_pos: 0,
                block_table: &tables[s],
                need_logits: true,
            })
            .collect();
        next.extend(b.forward_greedy(&inputs)?);
    }
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let pos = context + i;
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<SeqInput<'_>> = (0..batch)
            .map(|s| SeqInput {
                tokens: &toks[s],
                start_pos: pos,
                block_table: &tables[s],
                need_logits: true,
            })
            .collect();
        let started = Instant::now();
        next = match sampling {
            Some(rule) => {
                let rules: Vec<DeviceSampling> = (0..batch)
                    .map(|s| DeviceSampling {
                        uniform: ((i * 31 + s * 17) % 97) as f64 / 97.0,
                        ..rule
                    })
                    .collect();
                b.forward_sampled(&inputs, &rules, None)?
            }
            None => b.forward_greedy(&inputs)?,
        };
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = median(times);
    let graph_ms = b.time_last_graph(32)?;
    // The median step reads the context at its middle.
    let kv_tokens = batch * (context + warmup + steps / 2);
    let floor_ms = decode_bytes(&cfg, b.weight_bytes(), kv_tokens) / FLOOR_BANDWIDTH * 1e3;
    Ok(DecodeResult {
        shape: shape.to_string(),
        batch,
        context,
        steps,
        ms_per_step: ms,
        floor_ms,
        fraction_of_floor: floor_ms / ms,
        tokens_per_s: batch as f64 / ms * 1e3,
        graph_ms,
        graph_captures: b.captured_graphs().saturating_sub(graphs_before),
    })
}

/// Median wall time in ms of prefilling one `tokens`-token prompt in one
/// step (logits of its last token copied back), after a warm-up run.
pub fn time_prefill(
    b: &mut dyn ComputeBackend,
    tokens: usize,
    reps: usize,
) -> Result<f64, BackendError> {
    let prompt = pseudo_tokens(tokens, b.config().vocab_size, 99);
    let table: Vec<u32> = (0..tokens.div_ceil(BLOCK) as u32).collect();
    let mut logits = Vec::new();
    let mut times = Vec::new();
    for i in 0..reps + 1 {
        let started = Instant::now();
        b.forward(
            &[SeqInput {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                need_logits: true,
            }],
            &mut logits,
            None,
        )?;
        if i > 0 {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

/// One sequence of `tokens` prompt tokens, computed in one step (median of
/// `reps` after a warm-up run).
pub fn prefill(
    b: &mut CudaBackend,
    shape: &str,
    tokens: usize,
    reps: usize,
) -> Result<PrefillResult, BackendError> {
    let cfg = b.config().clone();
    let ms = time_prefill(b, tokens, reps)?;
    let t = tokens as f64;
    let flops = 2.0 * cfg.num_parameters() as f64 * t
        + 4.0 * cfg.num_layers as f64 * t * t * cfg.hidden_size as f64 / 2.0;
    Ok(PrefillResult {
        shape: shape.to_string(),
        tokens,
        ms,
        mfu_vs_790: flops / (ms * 1e-3) / MEASURED_PEAK_FLOPS,
    })
}

/// Times the four projections of a layer for `m`-token prefill steps of the
/// backend's model: `cublasGemmEx` against up to 16 cuBLASLt candidates
/// ([`CudaBackend::time_gemm_algorithms`]).
pub fn gemm_algos(b: &CudaBackend, m: usize) -> Result<Vec<GemmResult>, BackendError> {
    b.time_gemm_algorithms(m)
}
