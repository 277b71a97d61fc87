//! Benchmark, not a test: KV transfer throughput over loopback gRPC for
//! Llama-3-8B's KV shape (32 layers x 8 KV heads x 128) of random data, for
//! 512, 3000 (the goodput benchmark's prompts) and 8192-token prompts: bf16
//! on the wire as a CUDA prefill worker ships it (128 KiB per token), and f32
//! (256 KiB per token, up to 3000 tokens) as a CPU one does. Run it in
//! release:
//!
//! ```text
//! cargo test --release -p tandem --test transfer_throughput -- --ignored --nocapture
//! ```
//!
//! Each transfer is timed from the request to the assembled `KvExport`, both
//! sides in this process (server and client each on their own runtime).
//!
//! The sending side encodes each layer from f32 values once, as the prefill
//! engine's KV sink does; the receiving side keeps the chunks as they arrive
//! (a `KvPieces`), as the decode worker does before installing them.
//! `TANDEM_BENCH_TOKENS` (e.g. `3000`) limits the prompt lengths.

use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;
use std::sync::Arc;

use rand::Rng;
use tandem_api::infer::InferError;
use tandem_api::types::{KvDtype as EngineKvDtype, SamplingParams, TokenOutput};
use tandem_disagg::transfer::channel::server_builder;
use tandem_disagg::transfer::client::PrefillClient;
use tandem_disagg::transfer::pb::{KvDtype, KvLayout};
use tandem_disagg::transfer::service::{PrefillService, PrefillSource};
use tandem_disagg::transfer::{PrefillPart, RemotePrefillRequest};
use tokio_stream::wrappers::TcpListenerStream;

const LAYERS: u32 = 32;
const KV_HEADS: u32 = 8;
const HEAD_DIM: u32 = 128;

/// Ships pre-generated random KV of as many tokens as the prompt has, each
/// layer copied out of the source and encoded as a prefill does it.
struct RandomKv {
    /// One layer's K (or V) for the longest prompt; layers share it. The
    /// values are bf16-representable, as a CUDA backend's KV is.
    values: Arc<Vec<f32>>,
    dtype: EngineKvDtype,
}

impl PrefillSource for RandomKv {
    fn prefill_parts(
        &self,
        request: RemotePrefillRequest,
    ) -> BoxStream<'static, Result<PrefillPart, InferError>> {
        let tokens = request.prompt.len();
        let mut layout = KvLayout {
            num_layers: LAYERS,
            num_tokens: tokens as u32,
            kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
            ..KvLayout::default()
        };
        layout.set_dtype(match self.dtype {
            EngineKvDtype::F32 => KvDtype::F32,
            EngineKvDtype::Bf16 => KvDtype::Bf16,
        });
        let (values, dtype) = (self.values.clone(), self.dtype);
        let n = tokens * (KV_HEADS * HEAD_DIM) as usize;
        let layers = (0..LAYERS).map(move |index| {
            Ok(PrefillPart::Kv {
                layer: index,
                start_pos: 0,
                k: dtype.encode(&values[..n]),
                v: dtype.encode(&values[..n]),
            })
        });
        let first = TokenOutput {
            id: 1,
            logprob: None,
            top_logprobs: vec![],
        };
        futures::stream::iter(
            std::iter::once(Ok(PrefillPart::Layout(layout)))
                .chain(layers)
                .chain(std::iter::once(Ok(PrefillPart::FirstToken(first)))),
        )
        .boxed()
    }
}

#[test]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
fn kv_transfer_throughput_over_loopback_grpc() {
    let sizes: Vec<usize> = std::env::var("TANDEM_BENCH_TOKENS")
        .unwrap_or_else(|_| "512,3000,8192".into())
        .split(',')
        .map(|t| t.trim().parse().expect("prompt lengths"))
        .collect();
    let max = *sizes.iter().max().unwrap();
    let mut rng = rand::rng();
    let values: Arc<Vec<f32>> = Arc::new(
        (0..max * (KV_HEADS * HEAD_DIM) as usize)
            .map(|_| half::bf16::from_f32(rng.random_range(-4.0f32..4.0)).to_f32())
            .collect(),
    );
    measure(&sizes, values.clone(), EngineKvDtype::Bf16);
    let f32_sizes: Vec<usize> = sizes.iter().copied().filter(|&t| t <= 3000).collect();
    measure(&f32_sizes, values, EngineKvDtype::F32);
}

fn measure(sizes: &[usize], values: Arc<Vec<f32>>, dtype: EngineKvDtype) {
    let width = match dtype {
        EngineKvDtype::F32 => 4,
        EngineKvDtype::Bf16 => 2,
    };
    let bytes_per_token = 2 * (LAYERS * KV_HEADS * HEAD_DIM) as usize * width;
    let expected = values.clone();
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    server_rt.spawn(
        server_builder()
            .add_service(PrefillService::server(RandomKv { values, dtype }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = {
        let _runtime = client_rt.enter();
        PrefillClient::new(&addr, Duration::from_secs(60)).unwrap()
    };
    println!("KV transfer over loopback gRPC, {dtype:?} on the wire, {bytes_per_token} bytes/token ({LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM}, K and V)");
    println!(
        "{:>8} {:>10} {:>6} {:>10} {:>10} {:>8}",
        "tokens", "MiB", "runs", "best ms", "median ms", "GB/s"
    );
    for &tokens in sizes {
        let runs = if tokens >= 8192 { 5 } else { 10 };
        let mut times = Vec::new();
        for run in 0..=runs {
            let request = RemotePrefillRequest {
                request_id: format!("bench-{tokens}-{run}"),
                prompt: vec![1; tokens],
                sampling: SamplingParams::greedy(),
            };
            let started = Instant::now();
            let got = client_rt.block_on(client.prefill(request)).unwrap();
            let took = started.elapsed();
            assert_eq!(got.bytes, tokens * bytes_per_token);
            got.kv.check().unwrap();
            // Exact in either dtype: the values are bf16-representable.
            let n = tokens * (KV_HEADS * HEAD_DIM) as usize;
            let last = LAYERS as usize - 1;
            let mut v_last = vec![0f32; n];
            for p in got.kv.pieces.iter().filter(|p| p.layer == last) {
                let w = (KV_HEADS * HEAD_DIM) as usize;
                v_last[p.start_pos * w..(p.start_pos + p.num_tokens) * w]
                    .copy_from_slice(&dtype.decode(&p.v).unwrap());
            }
            assert_eq!(v_last[..], expected[..n]);
            if run > 0 {
                // Run 0 warms the connection and the allocator.
                times.push(took);
            }
        }
        times.sort();
        let median = times[times.len() / 2];
        let bytes = (tokens * bytes_per_token) as f64;
        println!(
            "{tokens:>8} {:>10.0} {runs:>6} {:>10.1} {:>10.1} {:>8.2}",
            bytes / (1 << 20) as f64,
            times[0].as_secs_f64() * 1e3,
            median.as_secs_f64() * 1e3,
            bytes / median.as_secs_f64() / 1e9
        );
    }
    server_rt.shutdown_background();
}
