//! `tandem gpu transfer-bench`: the KV transports between two GPU workers,
//! checked and timed through the code the workers run.
//!
//! This process is the decode worker (an engine on `--decode-device`); it
//! starts itself again as the prefill worker (an engine on
//! `--prefill-device` behind the `Prefill` gRPC service on loopback), since a
//! CUDA IPC handle cannot be opened by the process that exported it. Both
//! engines hold the same dummy weights (same shape, same seed). Then:
//!
//! - peer-copy ceiling: `cuMemcpyPeerAsync` GB/s between the two GPUs;
//! - correctness: for each prompt, greedy tokens after a remote prefill over
//!   cuda-ipc and over gRPC equal those of a local prefill on the decode GPU;
//! - speed: a long prompt's KV moved by each transport (the copy's GPU time
//!   for cuda-ipc; request to assembled KV for gRPC).
//!
//! With `--same-gpu`, the same again with the prefill worker on the decode GPU.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::common;
use tandem_api::infer::Infer;
use tandem_api::types::{GenerateEvent, GenerateRequest, SamplingParams, StopParams};
use tandem_disagg::roles::worker_service::WorkerService;
use tandem_disagg::transfer::channel::{incoming, server_builder};
use tandem_disagg::transfer::client::{IpcPrefill, PrefillClient};
use tandem_disagg::transfer::service::PrefillService;
use tandem_disagg::transfer::RemotePrefillRequest;
use tandem_engine::backend::cuda::ipc::peer_copy_gbps;
use tandem_engine::backend::{self, CudaOptions, DeviceSpec, WeightsSource};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model as model;

#[derive(Debug, Clone, Args)]
pub struct TransferBenchArgs {
    /// GPU of the prefill worker (a child process).
    #[arg(long, default_value = "cuda:0")]
    pub prefill_device: DeviceSpec,
    /// GPU of the decode worker (this process).
    #[arg(long, default_value = "cuda:1")]
    pub decode_device: DeviceSpec,
    /// Also run everything with the prefill worker on the decode GPU.
    #[arg(long)]
    pub same_gpu: bool,
    /// Model shape of the dummy weights (see --load-format dummy).
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// Prompt lengths whose greedy tokens are compared.
    #[arg(long, value_delimiter = ',', default_value = "17,300,1500,4096")]
    pub check_prompts: Vec<usize>,
    /// Generated tokens compared per prompt.
    #[arg(long, default_value_t = 32)]
    pub check_tokens: usize,
    /// Prompt length of the timed transfers.
    #[arg(long, default_value_t = 4096)]
    pub prompt_tokens: usize,
    /// Timed transfers per transport (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Bytes of the peer-copy measurement.
    #[arg(long, default_value_t = 1 << 30)]
    pub peer_copy_bytes: usize,
    /// Write the results as JSON lines here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Internal: run as the prefill worker (started by the bench itself).
    #[arg(long, hide = true)]
    pub serve_prefill: bool,
}

const BLOCK_SIZE: usize = 16;
/// Seeds of the made-up prompts, never reused within a run.
static PROMPT_SEED: AtomicU64 = AtomicU64::new(1);
const MAX_BATCH_TOKENS: usize = 2048;
const MAX_NUM_SEQS: usize = 8;

fn ordinal(device: DeviceSpec) -> anyhow::Result<usize> {
    match device {
        DeviceSpec::Cuda(n) => Ok(n),
        DeviceSpec::Cpu => bail!("the transfer bench needs CUDA devices (cuda:N)"),
    }
}

impl TransferBenchArgs {
    fn max_model_len(&self) -> usize {
        let longest = self
            .check_prompts
            .iter()
            .copied()
            .chain([self.prompt_tokens])
            .max()
            .unwrap_or(1);
        (longest + self.check_tokens + 1).next_multiple_of(BLOCK_SIZE)
    }

    /// The same engine on either side, so both hold the same weights and
    /// compute prompts in the same chunks.
    fn start_engine(&self, device: usize, role: &'static str) -> anyhow::Result<EngineHandle> {
        let config = model::dummy::config(&self.shape)?;
        let max_model_len = self.max_model_len();
        let opts = CudaOptions {
            max_batch_tokens: MAX_BATCH_TOKENS,
            max_num_seqs: MAX_NUM_SEQS,
            max_model_len,
            // Two workers may share one GPU.
            gpu_memory_utilization: 0.45,
            cuda_graphs: true,
            tensor_parallel_size: 1,
        };
        let backend = backend::create(
            &DeviceSpec::Cuda(device),
            config,
            WeightsSource::Dummy { seed: 0 },
            &opts,
        )?;
        let engine = Engine::start(
            backend,
            EngineConfig {
                block_size: BLOCK_SIZE,
                num_blocks: Some(4 * max_model_len.div_ceil(BLOCK_SIZE) + 64),
                max_batch_tokens: MAX_BATCH_TOKENS,
                max_num_seqs: MAX_NUM_SEQS,
                max_queue: 64,
                threads: 1,
                ..EngineConfig::default()
            },
            Vec::new(),
            max_model_len,
            role,
        )?;
        Ok(engine)
    }
}

pub fn run(a: TransferBenchArgs) -> anyhow::Result<()> {
    if a.serve_prefill {
        return serve_prefill(&a);
    }
    let (p, d) = (ordinal(a.prefill_device)?, ordinal(a.decode_device)?);
    let mut lines: Vec<String> = Vec::new();
    let mut emit = |v: serde_json::Value| {
        println!("{v}");
        lines.push(v.to_string());
    };

    let gbps = peer_copy_gbps(p, d, a.peer_copy_bytes, 10)?;
    emit(json!({
        "what": "peer_copy", "src": p, "dst": d, "bytes": a.peer_copy_bytes, "gb_per_s": gbps,
    }));
    if a.same_gpu {
        let same = peer_copy_gbps(d, d, a.peer_copy_bytes, 10)?;
        emit(json!({
            "what": "device_copy", "src": d, "dst": d, "bytes": a.peer_copy_bytes, "gb_per_s": same,
        }));
    }

    let started = Instant::now();
    let engine = a.start_engine(d, "decode")?;
    emit(json!({
        "what": "decode_engine", "device": d, "shape": a.shape,
        "seconds": started.elapsed().as_secs_f64(),
    }));
    let result = bench_pairs(&a, &engine, &mut emit);
    // The engine thread would tear its GPU state down while the process
    // exits (and the driver unloads underneath it): leave it idle instead.
    std::mem::forget(engine);
    let failures = result?;
    if let Some(path) = &a.json {
        std::fs::write(path, lines.join("\n") + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if failures > 0 {
        bail!("{failures} transfer checks failed");
    }
    println!("all transfer checks passed");
    Ok(())
}

/// Checks and times both transports with the prefill worker on each GPU;
/// returns the number of failed checks.
fn bench_pairs(
    a: &TransferBenchArgs,
    engine: &EngineHandle,
    emit: &mut impl FnMut(serde_json::Value),
) -> anyhow::Result<usize> {
    let (p, d) = (ordinal(a.prefill_device)?, ordinal(a.decode_device)?);
    let rt = common::runtime()?;
    let mut setups = vec![p];
    if a.same_gpu && p != d {
        setups.push(d);
    }
    let mut failures = 0;
    for prefill_gpu in setups {
        let mut child = PrefillChild::spawn(a, prefill_gpu)?;
        let pair = format!("prefill cuda:{prefill_gpu} -> decode cuda:{d}");
        let result = rt.block_on(run_pair(a, engine, child.port, &pair, emit));
        child.stop();
        failures += result?;
    }
    Ok(failures)
}

/// Token ids of a made-up prompt: deterministic, spread over the vocabulary.
fn prompt(len: usize, seed: u64, vocab: usize) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab as u64) as u32
        })
        .collect()
}

fn greedy_request(id: &str, prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: id.to_string(),
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopParams {
            max_tokens,
            stop_token_ids: Vec::new(),
            ignore_eos: true,
        },
    }
}

async fn tokens_of(mut stream: tandem_api::infer::GenerateStream) -> anyhow::Result<Vec<u32>> {
    let mut out = Vec::new();
    while let Some(event) = stream.next_event().await {
        match event {
            GenerateEvent::Token(t) => out.push(t.id),
            GenerateEvent::Error(e) => bail!("generation failed: {e}"),
            GenerateEvent::Finished(_) => break,
            GenerateEvent::Started { .. } | GenerateEvent::PromptLogprobs(_) => {}
        }
    }
    Ok(out)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Checks and times both transports with one prefill worker; returns the
/// number of failed checks.
async fn run_pair(
    a: &TransferBenchArgs,
    engine: &EngineHandle,
    port: u16,
    pair: &str,
    emit: &mut impl FnMut(serde_json::Value),
) -> anyhow::Result<usize> {
    let grpc = PrefillClient::new(
        &format!("http://127.0.0.1:{port}"),
        Duration::from_secs(120),
    )?;
    let vocab = model::dummy::config(&a.shape)?.vocab_size;
    let remote = |id: &str, prompt: Vec<u32>| RemotePrefillRequest {
        request_id: id.to_string(),
        prompt,
        sampling: SamplingParams::greedy(),
    };
    let mut failures = 0;
    // Every comparison gets a prompt neither engine has seen: a prompt found
    // in a prefix cache is computed in other chunks (only its tail), which
    // rounds differently in bf16, and that is not what is compared here.
    let fresh = |len: usize| prompt(len, PROMPT_SEED.fetch_add(1, Ordering::Relaxed), vocab);
    let local_tokens = |ids: Vec<u32>| {
        let stream = engine.generate(greedy_request("local", ids, a.check_tokens));
        async move { tokens_of(stream?).await }
    };
    for &len in &a.check_prompts {
        let ids = fresh(len);
        let local_for_ipc = local_tokens(ids.clone()).await?;
        let ipc = match grpc
            .prefill_via_cuda_ipc(engine, remote("ipc", ids.clone()))
            .await?
        {
            IpcPrefill::Written {
                reservation,
                first_token,
                ..
            } => {
                let req = greedy_request("ipc", ids.clone(), a.check_tokens);
                tokens_of(engine.generate_with_reserved(req, reservation, first_token)?).await?
            }
            IpcPrefill::Streamed(r) => bail!(
                "{pair}: the prefill worker declined cuda-ipc: {}",
                r.cuda_ipc_declined.unwrap_or_default()
            ),
        };
        let ids = fresh(len);
        let local_for_grpc = local_tokens(ids.clone()).await?;
        let streamed = grpc.prefill(remote("grpc", ids.clone())).await?;
        let req = greedy_request("grpc", ids.clone(), a.check_tokens);
        let over_grpc =
            tokens_of(engine.generate_with_kv(req, streamed.kv, streamed.first_token)?).await?;
        for (transport, got, local) in [
            ("cuda-ipc", &ipc, &local_for_ipc),
            ("grpc", &over_grpc, &local_for_grpc),
        ] {
            let passed = got == local && local.len() == a.check_tokens;
            failures += usize::from(!passed);
            let first_diff = got.iter().zip(local).position(|(x, y)| x != y);
            emit(json!({
                "what": "check", "pair": pair, "transport": transport, "prompt_tokens": len,
                "passed": passed, "tokens": got.len(), "first_difference": first_diff,
            }));
        }
    }

    let ids = fresh(a.prompt_tokens);
    let (mut ipc_copy, mut ipc_wall, mut ipc_bytes) = (Vec::new(), Vec::new(), 0u64);
    for rep in 0..=a.reps {
        let t = Instant::now();
        match grpc
            .prefill_via_cuda_ipc(engine, remote("ipc-bench", ids.clone()))
            .await?
        {
            IpcPrefill::Written { written, .. } => {
                if rep > 0 {
                    ipc_wall.push(t.elapsed().as_secs_f64());
                    ipc_copy.push(written.copy_seconds);
                }
                ipc_bytes = written.bytes;
            }
            IpcPrefill::Streamed(_) => bail!("{pair}: cuda-ipc declined in the timed runs"),
        }
    }
    let copy = median(ipc_copy);
    emit(json!({
        "what": "transfer", "pair": pair, "transport": "cuda-ipc", "prompt_tokens": a.prompt_tokens,
        "bytes": ipc_bytes, "copy_ms": copy * 1e3, "gb_per_s": ipc_bytes as f64 / copy / 1e9,
        "request_ms": median(ipc_wall) * 1e3,
        "note": "copy: GPU time of the kernel writing decode's blocks; request: Prefill call to KV in place (prompt cached on the prefill worker after the warm-up)",
    }));
    let (mut grpc_wall, mut grpc_bytes) = (Vec::new(), 0usize);
    for rep in 0..=a.reps {
        let t = Instant::now();
        let r = grpc.prefill(remote("grpc-bench", ids.clone())).await?;
        if rep > 0 {
            grpc_wall.push(t.elapsed().as_secs_f64());
        }
        grpc_bytes = r.bytes;
    }
    let wall = median(grpc_wall);
    emit(json!({
        "what": "transfer", "pair": pair, "transport": "grpc", "prompt_tokens": a.prompt_tokens,
        "bytes": grpc_bytes, "request_ms": wall * 1e3, "gb_per_s": grpc_bytes as f64 / wall / 1e9,
        "note": "request: Prefill call to the KV assembled in host memory (f32 on the wire; prompt cached on the prefill worker after the warm-up)",
    }));
    Ok(failures)
}

/// The prefill worker process, stopped (killed) on drop.
struct PrefillChild {
    child: Child,
    port: u16,
}

impl PrefillChild {
    fn spawn(a: &TransferBenchArgs, device: usize) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut child = Process::new(exe)
            .args(["gpu", "transfer-bench", "--serve-prefill"])
            .args(["--prefill-device", &format!("cuda:{device}")])
            .args(["--shape", &a.shape])
            .args(["--prompt-tokens", &a.prompt_tokens.to_string()])
            .args(["--check-tokens", &a.check_tokens.to_string()])
            .arg("--check-prompts")
            .arg(
                a.check_prompts
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the prefill worker")?;
        let stdout = child.stdout.take().expect("piped");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok());
        match port {
            Some(port) => Ok(Self { child, port }),
            None => {
                let _ = child.kill();
                bail!("the prefill worker did not start (said {line:?})")
            }
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrefillChild {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The child: a prefill engine behind `Prefill` and `Worker` on loopback,
/// until its stdin closes (the bench ended or died).
fn serve_prefill(a: &TransferBenchArgs) -> anyhow::Result<()> {
    let engine = a.start_engine(ordinal(a.prefill_device)?, "prefill")?;
    common::runtime()?.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let mut out = std::io::stdout();
        writeln!(out, "PORT {port}")?;
        out.flush()?;
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {}
        });
        server_builder()
            .add_service(PrefillService::server(engine.clone()))
            .add_service(WorkerService::server(engine))
            .serve_with_incoming_shutdown(incoming(listener), async {
                let _ = stdin_closed.await;
            })
            .await?;
        Ok(())
    })
}
