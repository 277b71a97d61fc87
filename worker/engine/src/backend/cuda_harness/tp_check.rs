//! Tensor parallelism on a GPU machine (`tandem gpu tp-check`): a group of N
//! GPUs against one GPU on the same random models (logits of prefill chunks,
//! mixed batches and decode steps of every projection path, eager and CUDA
//! graphs; greedy tokens), KV export / import and streamed KV of a group
//! (a disaggregated hand-over between two groups of the same size goes
//! through exactly these calls), and timings of an 8B-shaped model: decode
//! and prefill at N GPUs against 1, with the share of the all-reduces.

use std::time::Instant;

use serde::Serialize;

use super::bench::{median, time_prefill};
use super::check::{
    bf16_rounded, check_config, pseudo_tokens, relative_error, same_choice, LOGITS_TOLERANCE,
};
use crate::backend::cuda::tp::TensorParallelBackend;
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::{
    BackendError, ComputeBackend, DeviceSampling, KvLayerSink, SeqInput, WeightsSource,
};
use tandem_model::{dummy, testing, Architecture, ModelConfig};

pub use super::check::CheckResult;

fn result(name: String, passed: bool, detail: String) -> CheckResult {
    CheckResult {
        name,
        passed,
        detail,
    }
}

fn options(tp: usize) -> CudaOptions {
    CudaOptions {
        max_batch_tokens: 1024,
        max_num_seqs: 8,
        max_model_len: 1024,
        gpu_memory_utilization: 0.9,
        cuda_graphs: true,
        tensor_parallel_size: tp,
    }
}

const BLOCK: usize = 16;
const POOL_BLOCKS: usize = 160;

/// Greedy rules for `n` rows.
fn greedy(n: usize) -> Vec<DeviceSampling> {
    vec![DeviceSampling::GREEDY; n]
}

/// Every logits row and greedy token of one fixed schedule: five sequences
/// prefilled in uneven chunks and mixed batches, decoded (teacher-forced, so
/// both sides see the same inputs) at batch 1 and 2 (the fused projections)
/// and 5 (cuBLAS), then one more sequence decoded greedily on its own picks.
fn schedule(b: &mut dyn ComputeBackend) -> Result<(Vec<Vec<f32>>, Vec<u32>), BackendError> {
    let vocab = b.config().vocab_size;
    let prompt_lens = [150usize, 61, 17, 90, 33];
    let decode = 12;
    let toks: Vec<Vec<u32>> = prompt_lens
        .iter()
        .enumerate()
        .map(|(i, &n)| pseudo_tokens(n + decode, vocab, i + 1))
        .collect();
    // Sequence i takes blocks i, i+5, i+10, ...: interleaved in the pool.
    let tables: Vec<Vec<u32>> = (0..5)
        .map(|i| (0..16).map(|j| (j * 5 + i) as u32).collect())
        .collect();
    let mut rows = Vec::new();
    let mut step =
        |b: &mut dyn ComputeBackend, parts: &[(usize, usize, usize)]| -> Result<(), BackendError> {
            let batch: Vec<SeqInput<'_>> = parts
                .iter()
                .map(|&(s, from, to)| SeqInput {
                    tokens: &toks[s][from..to],
                    start_pos: from,
                    block_table: &tables[s],
                    need_logits: true,
                })
                .collect();
            let mut logits = Vec::new();
            b.forward(&batch, &mut logits, None)?;
            rows.extend(logits.chunks(vocab).map(<[f32]>::to_vec));
            Ok(())
        };
    step(b, &[(0, 0, 37)])?;
    step(b, &[(0, 37, 150), (1, 0, 61), (2, 0, 17)])?;
    step(b, &[(3, 0, 90), (4, 0, 33)])?;
    let mut pos = prompt_lens;
    for (steps, seqs) in [(4, 1), (4, 2), (4, 5)] {
        for _ in 0..steps {
            let parts: Vec<(usize, usize, usize)> =
                (0..seqs).map(|s| (s, pos[s], pos[s] + 1)).collect();
            step(b, &parts)?;
            for p in pos.iter_mut().take(seqs) {
                *p += 1;
            }
        }
    }
    // Greedy on its own picks.
    let prompt = pseudo_tokens(40, vocab, 9);
    let table: Vec<u32> = (100..110).collect();
    let mut tokens = b.forward_sampled(
        &[SeqInput {
            tokens: &prompt,
            start_pos: 0,
            block_table: &table,
            need_logits: true,
        }],
        &greedy(1),
        None,
    )?;
    for i in 0..16 {
        let last = [*tokens.last().expect("one token")];
        let next = b.forward_sampled(
            &[SeqInput {
                tokens: &last,
                start_pos: 40 + i,
                block_table: &table,
                need_logits: true,
            }],
            &greedy(1),
            None,
        )?;
        tokens.extend(next);
    }
    Ok((rows, tokens))
}

fn compare(
    name: String,
    got: &(Vec<Vec<f32>>, Vec<u32>),
    want: &(Vec<Vec<f32>>, Vec<u32>),
) -> Vec<CheckResult> {
    let mut worst = 0f64;
    let mut flips = 0;
    for (g, w) in got.0.iter().zip(&want.0) {
        worst = worst.max(relative_error(g, w));
        flips += usize::from(!same_choice(g, w));
    }
    let rows_match = got.0.len() == want.0.len();
    vec![
        result(
            format!("{name}: logits"),
            rows_match && worst <= LOGITS_TOLERANCE && flips == 0,
            format!(
                "{} rows (vs {}), worst rel err {worst:.2e} (tolerance {LOGITS_TOLERANCE:.0e}), \
                 {flips} argmax flips",
                got.0.len(),
                want.0.len()
            ),
        ),
        result(
            format!("{name}: greedy tokens"),
            got.1 == want.1,
            format!("{:?} vs {:?}", got.1, want.1),
        ),
    ]
}

/// Collects streamed KV per (layer, sequence).
#[derive(Default)]
struct Collect {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl KvLayerSink for Collect {
    fn layer_computed(&mut self, layer: usize, _seq: usize, k: &[f32], v: &[f32]) {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, (Vec::new(), Vec::new()));
        }
        self.layers[layer].0.extend_from_slice(k);
        self.layers[layer].1.extend_from_slice(v);
    }
}

/// Greedy tokens decoded from a prompt of `prompt_len` tokens whose KV is in
/// `table`, starting from `first`.
fn decode_from(
    b: &mut dyn ComputeBackend,
    table: &[u32],
    prompt_len: usize,
    first: u32,
    steps: usize,
) -> Result<Vec<u32>, BackendError> {
    let mut tokens = vec![first];
    for i in 0..steps {
        let last = [*tokens.last().expect("one token")];
        tokens.extend(b.forward_sampled(
            &[SeqInput {
                tokens: &last,
                start_pos: prompt_len + i,
                block_table: table,
                need_logits: true,
            }],
            &greedy(1),
            None,
        )?);
    }
    Ok(tokens)
}

fn one_seq<'a>(tokens: &'a [u32], block_table: &'a [u32]) -> [SeqInput<'a>; 1] {
    [SeqInput {
        tokens,
        start_pos: 0,
        block_table,
        need_logits: true,
    }]
}

/// The group's KV paths: a prompt prefilled with its KV streamed (what a
/// prefill worker sends), that KV written into other blocks (what the decode
/// worker of an equal group does), and exported then imported whole; all
/// three decode the same tokens, and the group's export equals one GPU's.
fn kv_paths(
    tp: &mut TensorParallelBackend,
    single: &mut CudaBackend,
) -> Result<Vec<CheckResult>, BackendError> {
    let vocab = tp.config().vocab_size;
    let n = 70;
    let prompt = pseudo_tokens(n, vocab, 21);
    let (a, b, c): (Vec<u32>, Vec<u32>, Vec<u32>) = (
        (120..126).collect(),
        (130..136).collect(),
        (140..146).collect(),
    );
    let seq = |table| one_seq(&prompt, table);
    let mut streamed = Collect::default();
    let first = tp.forward_sampled(&seq(&a), &greedy(1), Some(&mut streamed))?[0];
    for (layer, (k, v)) in streamed.layers.iter().enumerate() {
        tp.write_kv_layer(&b, 0, layer, k, v)?;
    }
    let export = tp.read_kv(&a, n)?;
    tp.write_kv(&c, &export)?;
    let from_a = decode_from(tp, &a, n, first, 12)?;
    let from_b = decode_from(tp, &b, n, first, 12)?;
    let from_c = decode_from(tp, &c, n, first, 12)?;
    single.forward_sampled(&seq(&a), &greedy(1), None)?;
    let reference = single.read_kv(&a, n)?;
    let mut worst = 0f64;
    for (g, w) in export.layers.iter().zip(&reference.layers) {
        worst = worst.max(relative_error(&g.0, &w.0));
        worst = worst.max(relative_error(&g.1, &w.1));
    }
    let streamed_vs_export = streamed
        .layers
        .iter()
        .zip(&export.layers)
        .map(|(s, e)| relative_error(&s.0, &e.0).max(relative_error(&s.1, &e.1)))
        .fold(0f64, f64::max);
    Ok(vec![
        result(
            format!("tp{}: streamed KV -> other blocks decodes the same", tp.size()),
            from_b == from_a,
            format!("{from_b:?} vs {from_a:?}"),
        ),
        result(
            format!("tp{}: exported KV -> import decodes the same", tp.size()),
            from_c == from_a,
            format!("{from_c:?} vs {from_a:?}"),
        ),
        result(
            format!("tp{}: export (whole heads) equals one GPU's", tp.size()),
            worst <= LOGITS_TOLERANCE && export.kv_heads == reference.kv_heads,
            format!(
                "{} kv heads, worst rel err {worst:.2e}; streamed vs export {streamed_vs_export:.2e}",
                export.kv_heads
            ),
        ),
    ])
}

/// The checks for a group of `size` GPUs from `cuda:first`, printing each
/// result as it comes (a hang in a later check leaves the earlier ones).
pub fn run_checks(first: usize, size: usize) -> Vec<CheckResult> {
    let mut out = Vec::new();
    let emit = |rs: Vec<CheckResult>, out: &mut Vec<CheckResult>| {
        for r in rs {
            println!(
                "{}  {}  {}",
                if r.passed { "PASS" } else { "FAIL" },
                r.name,
                r.detail
            );
            out.push(r);
        }
    };
    let llama128 = ModelConfig {
        head_dim: 128,
        hidden_size: 512,
        ..check_config(Architecture::Llama)
    };
    for (label, cfg) in [
        ("llama hd64", check_config(Architecture::Llama)),
        ("qwen2 hd32 bias", check_config(Architecture::Qwen2)),
        ("llama hd128", llama128),
    ] {
        let name = format!("tp{size} vs tp1, {label}");
        let checked = (|| -> Result<Vec<CheckResult>, BackendError> {
            let weights = bf16_rounded(&testing::random_weights(&cfg, 7));
            let mut single = CudaBackend::new(first, cfg.clone(), &weights, options(1))?;
            single.init_kv_cache(BLOCK, POOL_BLOCKS)?;
            let want = schedule(&mut single)?;
            let mut tp = TensorParallelBackend::new(
                first,
                size,
                cfg.clone(),
                WeightsSource::Host(&weights),
                options(size),
            )?;
            tp.init_kv_cache(BLOCK, POOL_BLOCKS)?;
            let mut rs = Vec::new();
            tp.set_cuda_graphs(false)?;
            let eager = schedule(&mut tp)?;
            rs.extend(compare(format!("{name}, eager"), &eager, &want));
            tp.set_cuda_graphs(true)?;
            tp.init_kv_cache(BLOCK, POOL_BLOCKS)?;
            let graphs = schedule(&mut tp)?;
            rs.extend(compare(format!("{name}, CUDA graphs"), &graphs, &want));
            rs.extend(kv_paths(&mut tp, &mut single)?);
            Ok(rs)
        })();
        match checked {
            Ok(rs) => emit(rs, &mut out),
            Err(e) => emit(vec![result(name, false, e.to_string())], &mut out),
        }
    }
    // More GPUs than visible: a clear refusal.
    let cfg = check_config(Architecture::Llama);
    let too_many = 64;
    let refused = match TensorParallelBackend::new(
        first,
        too_many,
        ModelConfig {
            num_heads: 64,
            num_kv_heads: 64,
            hidden_size: 64 * cfg.head_dim,
            intermediate_size: 64 * 8,
            ..cfg
        },
        WeightsSource::Dummy { seed: 1 },
        options(too_many),
    ) {
        Ok(_) => "accepted".to_string(),
        Err(e) => e.to_string(),
    };
    emit(
        vec![result(
            "more GPUs than visible is refused".into(),
            refused.contains("needs GPUs"),
            refused,
        )],
        &mut out,
    );
    out
}

#[derive(Debug, Clone, Serialize)]
pub struct TpTiming {
    pub shape: String,
    pub tensor_parallel_size: usize,
    pub what: String,
    pub ms: f64,
}

/// Median wall time of a decode step of `batch` sequences after a
/// `context`-token prompt each (greedy, tokens fed back).
pub fn time_decode(
    b: &mut dyn ComputeBackend,
    batch: usize,
    context: usize,
    steps: usize,
) -> Result<f64, BackendError> {
    let vocab = b.config().vocab_size;
    let warmup = 8;
    let per_seq = (context + warmup + steps).div_ceil(BLOCK);
    let tables: Vec<Vec<u32>> = (0..batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| pseudo_tokens(context, vocab, s))
        .collect();
    let mut next = Vec::with_capacity(batch);
    let per_step = (4096 / context).max(1);
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
        next.extend(b.forward_sampled(&inputs, &greedy(group.len()), None)?);
    }
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let inputs: Vec<SeqInput<'_>> = (0..batch)
            .map(|s| SeqInput {
                tokens: &toks[s],
                start_pos: context + i,
                block_table: &tables[s],
                need_logits: true,
            })
            .collect();
        let started = Instant::now();
        next = b.forward_sampled(&inputs, &greedy(batch), None)?;
        if i >= warmup {
            times.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(median(times))
}

/// What a benchmark run measures.
#[derive(Debug, Clone)]
pub struct BenchPlan {
    pub shape: String,
    pub batches: Vec<usize>,
    pub prefill: Vec<usize>,
    pub context: usize,
    pub steps: usize,
}

fn bench_options(plan: &BenchPlan, tp: usize) -> CudaOptions {
    let max_batch = plan.batches.iter().copied().max().unwrap_or(1);
    let max_prefill = plan.prefill.iter().copied().max().unwrap_or(0);
    CudaOptions {
        max_batch_tokens: max_prefill.max(4096),
        max_num_seqs: max_batch,
        max_model_len: 8192,
        gpu_memory_utilization: 0.95,
        cuda_graphs: true,
        tensor_parallel_size: tp,
    }
}

fn bench_blocks(plan: &BenchPlan) -> usize {
    let max_batch = plan.batches.iter().copied().max().unwrap_or(1);
    let max_prefill = plan.prefill.iter().copied().max().unwrap_or(0);
    (max_batch * (plan.context + 8 + plan.steps).div_ceil(BLOCK)).max(max_prefill.div_ceil(BLOCK))
        + 16
}

/// Times `plan` on `b`, emitting one record per measurement.
fn time_all(
    b: &mut dyn ComputeBackend,
    plan: &BenchPlan,
    tp: usize,
    emit: &mut dyn FnMut(TpTiming),
) -> Result<(), BackendError> {
    for &t in &plan.prefill {
        let ms = time_prefill(b, t, 5)?;
        emit(TpTiming {
            shape: plan.shape.clone(),
            tensor_parallel_size: tp,
            what: format!("prefill {t}"),
            ms,
        });
    }
    for &batch in &plan.batches {
        let ms = time_decode(b, batch, plan.context, plan.steps)?;
        emit(TpTiming {
            shape: plan.shape.clone(),
            tensor_parallel_size: tp,
            what: format!("decode batch {batch}"),
            ms,
        });
    }
    Ok(())
}

/// A timed run on a group, profiled by the caller.
type Timed = Box<dyn Fn(&mut TensorParallelBackend) -> Result<f64, BackendError>>;

/// Decode and prefill of `plan.shape` (dummy weights) on one GPU and on a
/// group of `size`, then a per-operation profile of the group's steps (eager)
/// with the all-reduces' share. Returns JSON lines.
pub fn run_bench(
    first: usize,
    size: usize,
    plan: &BenchPlan,
) -> Result<Vec<serde_json::Value>, BackendError> {
    let cfg = dummy::config(&plan.shape).map_err(|e| BackendError::Weights(e.to_string()))?;
    let mut lines = Vec::new();
    let emit = |v: serde_json::Value, lines: &mut Vec<serde_json::Value>| {
        println!("{v}");
        lines.push(v);
    };
    {
        let mut single = CudaBackend::new_dummy(first, cfg.clone(), 1, bench_options(plan, 1))?;
        single.init_kv_cache(BLOCK, bench_blocks(plan))?;
        emit(
            serde_json::json!({"device": single.device_name(), "shape": plan.shape,
                "tensor_parallel_size": 1, "rank_weight_gib": single.weight_bytes() as f64 / (1u64 << 30) as f64}),
            &mut lines,
        );
        let mut rows = Vec::new();
        time_all(&mut single, plan, 1, &mut |t| rows.push(t))?;
        for r in rows {
            emit(serde_json::to_value(r).expect("serialisable"), &mut lines);
        }
    }
    let mut tp = TensorParallelBackend::new(
        first,
        size,
        cfg,
        WeightsSource::Dummy { seed: 1 },
        bench_options(plan, size),
    )?;
    tp.init_kv_cache(BLOCK, bench_blocks(plan))?;
    emit(
        serde_json::json!({"device": tp.device_name(), "shape": plan.shape,
            "tensor_parallel_size": size, "rank_weight_gib": tp.rank_weight_bytes() as f64 / (1u64 << 30) as f64}),
        &mut lines,
    );
    let mut rows = Vec::new();
    time_all(&mut tp, plan, size, &mut |t| rows.push(t))?;
    for r in rows {
        emit(serde_json::to_value(r).expect("serialisable"), &mut lines);
    }
    // Without CUDA graphs (the all-reduces launched one by one).
    tp.set_cuda_graphs(false)?;
    for &batch in &plan.batches {
        let ms = time_decode(&mut tp, batch, plan.context, plan.steps)?;
        emit(
            serde_json::json!({"shape": plan.shape, "tensor_parallel_size": size,
                "what": format!("decode batch {batch} (no CUDA graphs)"), "ms": ms}),
            &mut lines,
        );
    }
    tp.set_cuda_graphs(true)?;
    let max_prefill = plan.prefill.iter().copied().max();
    let mut profiles: Vec<(String, Timed)> = Vec::new();
    for &batch in &plan.batches {
        let (context, shape) = (plan.context, plan.shape.clone());
        profiles.push((
            format!("{shape} tp{size} decode batch {batch}"),
            Box::new(move |b| time_decode(b, batch, context, 16)),
        ));
    }
    if let Some(t) = max_prefill {
        profiles.push((
            format!("{} tp{size} prefill {t}", plan.shape),
            Box::new(move |b| time_prefill(b, t, 2)),
        ));
    }
    for (label, f) in profiles {
        tp.start_profile()?;
        let timed = f(&mut tp);
        let ops = tp.take_profile()?;
        timed?;
        let total: f64 = ops.iter().map(|(_, ms)| ms).sum();
        let reduce: f64 = ops
            .iter()
            .filter(|(n, _)| n == "all_reduce")
            .map(|(_, ms)| ms)
            .sum();
        let ops: serde_json::Map<String, serde_json::Value> = ops
            .into_iter()
            .map(|(n, ms)| (n, serde_json::json!((ms * 1000.0).round() / 1000.0)))
            .collect();
        emit(
            serde_json::json!({"profile": label, "gpu_ms_per_step": total,
                "all_reduce_ms_per_step": reduce, "all_reduce_share": reduce / total.max(1e-9),
                "ops": ops}),
            &mut lines,
        );
    }
    Ok(lines)
}
