//! `tandem gpu`: the CUDA backend's correctness checks and benchmarks, run
//! from the release binary on a GPU machine (which has no Rust toolchain).

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use tandem_engine::backend::cuda::CudaBackend;
use tandem_engine::backend::cuda_harness::{bench, check, tp_check};
use tandem_engine::backend::{DeviceSampling, DeviceSpec};

#[derive(Debug, Subcommand)]
pub enum GpuCommand {
    /// CUDA vs CPU: logits on random models and the default model, greedy
    /// tokens, KV export/import/streaming, graphs vs eager. Exits non-zero if
    /// any check fails.
    Check(CheckArgs),
    /// Decode and prefill timings with dummy weights (8B and SmolLM2 shapes),
    /// one JSON line each. Decode lines give `ms_per_step` (wall time of a
    /// step, host side included) and `graph_ms` (device time of the step's
    /// CUDA graph replayed back to back).
    Bench(GpuBenchArgs),
    /// KV transfer between a prefill and a decode worker on two GPUs (or
    /// one): peer-copy ceiling, cuda-ipc and gRPC GB/s, greedy tokens equal.
    TransferBench(super::gpu_transfer::TransferBenchArgs),
    /// Tensor parallelism: a group of GPUs against one on random models
    /// (logits, greedy tokens, eager and CUDA graphs, KV export/import and
    /// streaming), then with --bench the 8B shape's decode and prefill at
    /// both sizes and the all-reduces' share. Exits non-zero if a check fails.
    TpCheck(TpCheckArgs),
}

#[derive(Debug, Args)]
pub struct TpCheckArgs {
    /// The group's first GPU.
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    #[arg(long, default_value_t = 2)]
    pub tensor_parallel_size: usize,
    /// Also time decode and prefill (dummy weights of --shape).
    #[arg(long)]
    pub bench: bool,
    /// Skip the correctness checks (with --bench: timings only).
    #[arg(long)]
    pub no_checks: bool,
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    pub batches: Vec<usize>,
    /// Prefill lengths.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub prefill: Vec<usize>,
    /// Prompt tokens before the timed decode steps.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps (after 8 warm-up steps).
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Write the benchmark's JSON lines here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The GPU to check.
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    /// A GGUF or HF model to compare too (the default model in CI's docs).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct GpuBenchArgs {
    #[arg(long, default_value = "cuda")]
    pub device: DeviceSpec,
    /// Decode batch sizes of the 8B shape.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    pub batches: Vec<usize>,
    /// Prompt tokens before the timed decode steps.
    #[arg(long, default_value_t = 128)]
    pub context: usize,
    /// Timed decode steps (after 8 warm-up steps).
    #[arg(long, default_value_t = 64)]
    pub steps: usize,
    /// Prefill lengths of the 8B shape.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub prefill: Vec<usize>,
    /// Shape of the big model (see --load-format dummy).
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// Write the results as JSON lines here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Also time each operation of some steps (eager, with CUDA events): where
    /// a step's GPU time goes.
    #[arg(long)]
    pub profile: bool,
    /// Only time the big shape's prefill GEMMs at these token counts:
    /// cuBLAS as the backend runs them against cuBLASLt's other candidate
    /// algorithms.
    #[arg(long, value_delimiter = ',')]
    pub gemm_algos: Vec<usize>,
    /// Parts of the run to leave out (for short runs of one question, such
    /// as long-context decode at batch).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub skip: Vec<BenchPart>,
}

/// Parts of `tandem gpu bench` that `--skip` can leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPart {
    /// The prefill timings of the big shape.
    Prefill,
    /// Batch-1 decode other ways (cuBLAS projections, PDL, sampled).
    Variants,
    /// The SmolLM2-135M shape's decode.
    Smollm2,
}

/// Batch-1 decode of `shape` other ways: every projection on cuBLAS instead
/// of the fused kernels, programmatic dependent launch the other way than
/// the default (on where the GPU has it: compute capability 9.0 and newer), and
/// sampling on the device ([`bench::BENCH_SAMPLING`], and top-p alone)
/// instead of greedy.
fn variants(
    b: &mut CudaBackend,
    shape: &str,
    context: usize,
    steps: usize,
) -> anyhow::Result<Vec<bench::DecodeResult>> {
    b.set_fused_gemv(false);
    let unfused = bench::decode(b, shape, 1, context, steps, None);
    b.set_fused_gemv(true);
    let mut unfused = unfused.context("decode bench (cuBLAS projections)")?;
    unfused.shape = format!("{shape} (cuBLAS projections)");
    let pdl = b.pdl();
    b.set_pdl(!pdl)?;
    let early = bench::decode(b, shape, 1, context, steps, None);
    b.set_pdl(pdl)?;
    let mut early = early.context("decode bench (PDL toggled)")?;
    let toggled = if pdl { "without" } else { "with" };
    early.shape = format!("{shape} ({toggled} programmatic dependent launch)");
    let mut sampled = bench::decode(b, shape, 1, context, steps, Some(bench::BENCH_SAMPLING))
        .context("decode bench (sampled)")?;
    sampled.shape = format!("{shape} (sampled on the device: T 0.8, top-k 50, top-p 0.95)");
    let top_p_only = DeviceSampling {
        top_k: 0,
        ..bench::BENCH_SAMPLING
    };
    let mut nucleus = bench::decode(b, shape, 1, context, steps, Some(top_p_only))
        .context("decode bench (top-p only)")?;
    nucleus.shape = format!("{shape} (sampled on the device: T 0.8, top-p 0.95)");
    Ok(vec![unfused, early, sampled, nucleus])
}

/// Runs `f` with per-operation profiling on and returns it as a JSON line.
fn profiled<T>(
    b: &mut CudaBackend,
    label: String,
    f: impl FnOnce(&mut CudaBackend) -> anyhow::Result<T>,
) -> anyhow::Result<serde_json::Value> {
    b.start_profile();
    let result = f(b);
    let ops = b.take_profile();
    result?;
    let total: f64 = ops.iter().map(|(_, ms)| ms).sum();
    let ops: serde_json::Map<String, serde_json::Value> = ops
        .into_iter()
        .map(|(name, ms)| (name, serde_json::json!((ms * 1000.0).round() / 1000.0)))
        .collect();
    Ok(
        serde_json::json!({"profile": label, "gpu_ms_per_step": (total * 1000.0).round() / 1000.0, "ops": ops}),
    )
}

fn ordinal(device: DeviceSpec) -> anyhow::Result<usize> {
    match device {
        DeviceSpec::Cuda(n) => Ok(n),
        DeviceSpec::Cpu => bail!("tandem gpu needs --device cuda or cuda:N"),
    }
}

pub fn run(command: GpuCommand) -> anyhow::Result<()> {
    match command {
        GpuCommand::Check(a) => run_check(a),
        GpuCommand::Bench(a) => run_bench(a),
        GpuCommand::TransferBench(a) => super::gpu_transfer::run(a),
        GpuCommand::TpCheck(a) => run_tp_check(a),
    }
}

fn run_tp_check(a: TpCheckArgs) -> anyhow::Result<()> {
    let first = ordinal(a.device)?;
    let results = if a.no_checks {
        Vec::new()
    } else {
        tp_check::run_checks(first, a.tensor_parallel_size)
    };
    let failed = results.iter().filter(|r| !r.passed).count();
    if a.bench {
        let plan = tp_check::BenchPlan {
            shape: a.shape.clone(),
            batches: a.batches.clone(),
            prefill: a.prefill.clone(),
            context: a.context,
            steps: a.steps,
        };
        let lines = tp_check::run_bench(first, a.tensor_parallel_size, &plan)
            .context("tensor-parallel benchmark")?;
        if let Some(path) = &a.json {
            let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            std::fs::write(path, text.join("\n") + "\n")
                .with_context(|| format!("writing {}", path.display()))?;
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} tensor-parallel checks failed",
            results.len()
        );
    }
    println!("all {} tensor-parallel checks passed", results.len());
    Ok(())
}

fn run_check(a: CheckArgs) -> anyhow::Result<()> {
    let results = check::run_all(ordinal(a.device)?, a.model.as_deref());
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in &results {
        println!(
            "{}  {:width$}  {}",
            if r.passed { "PASS" } else { "FAIL" },
            r.name,
            r.detail
        );
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    if failed > 0 {
        bail!("{failed} of {} GPU checks failed", results.len());
    }
    println!("all {} GPU checks passed", results.len());
    Ok(())
}

fn run_bench(a: GpuBenchArgs) -> anyhow::Result<()> {
    let ordinal = ordinal(a.device)?;
    let mut lines: Vec<String> = Vec::new();
    let mut emit = |v: serde_json::Value| {
        println!("{v}");
        lines.push(v.to_string());
    };
    let max_batch = a.batches.iter().copied().max().unwrap_or(1);
    let max_prefill = a.prefill.iter().copied().max().unwrap_or(0);
    {
        let tokens_per_seq = a.context + 8 + a.steps;
        let blocks = (max_batch * tokens_per_seq.div_ceil(16)).max(max_prefill.div_ceil(16)) + 16;
        let mut b = bench::backend(ordinal, &a.shape, max_prefill.max(4096), max_batch, blocks)
            .map_err(anyhow::Error::msg)?;
        emit(serde_json::json!({
            "device": b.device_name(),
            "shape": a.shape,
            "weight_gib": b.weight_bytes() as f64 / (1u64 << 30) as f64,
            "prefill_attention": b.prefill_kernel_name(),
        }));
        if !a.gemm_algos.is_empty() {
            for &m in &a.gemm_algos {
                for r in bench::gemm_algos(&b, m).context("GEMM algorithms")? {
                    emit(serde_json::to_value(r)?);
                }
            }
            return Ok(());
        }
        let prefills = if a.skip.contains(&BenchPart::Prefill) {
            &[][..]
        } else {
            &a.prefill[..]
        };
        for &t in prefills {
            let r = bench::prefill(&mut b, &a.shape, t, 5).context("prefill bench")?;
            emit(serde_json::to_value(r)?);
        }
        for &batch in &a.batches {
            let r = bench::decode(&mut b, &a.shape, batch, a.context, a.steps, None)
                .context("decode bench")?;
            emit(serde_json::to_value(r)?);
        }
        if !a.skip.contains(&BenchPart::Variants) {
            for r in variants(&mut b, &a.shape, a.context, a.steps)? {
                emit(serde_json::to_value(r)?);
            }
        }
        if a.profile {
            for &batch in &[1, max_batch] {
                let label = format!("{} decode batch {batch}", a.shape);
                emit(profiled(&mut b, label, |b| {
                    Ok(bench::decode(b, &a.shape, batch, a.context, 16, None)?)
                })?);
            }
            if max_prefill > 0 && !a.skip.contains(&BenchPart::Prefill) {
                let label = format!("{} prefill {max_prefill}", a.shape);
                emit(profiled(&mut b, label, |b| {
                    Ok(bench::prefill(b, &a.shape, max_prefill, 2)?)
                })?);
            }
        }
    }
    if !a.skip.contains(&BenchPart::Smollm2) {
        let shape = "smollm2-135m";
        let blocks = (a.context + 8 + 128).div_ceil(16) + 16;
        let mut b = bench::backend(ordinal, shape, 4096, 1, blocks).map_err(anyhow::Error::msg)?;
        let r = bench::decode(&mut b, shape, 1, a.context, 128, None).context("decode bench")?;
        emit(serde_json::to_value(r)?);
        if !a.skip.contains(&BenchPart::Variants) {
            for r in variants(&mut b, shape, a.context, 128)? {
                emit(serde_json::to_value(r)?);
            }
        }
        if a.profile {
            let label = format!("{shape} decode batch 1");
            emit(profiled(&mut b, label, |b| {
                Ok(bench::decode(b, shape, 1, a.context, 32, None)?)
            })?);
        }
        // The same without CUDA graphs: what launching each kernel costs.
        b.set_cuda_graphs(false);
        let mut r =
            bench::decode(&mut b, shape, 1, a.context, 128, None).context("decode bench")?;
        r.shape = format!("{shape} (no CUDA graphs)");
        emit(serde_json::to_value(r)?);
    }
    if let Some(path) = a.json {
        std::fs::write(&path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
