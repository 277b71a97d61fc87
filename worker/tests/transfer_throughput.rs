//! Benchmark, not a test: KV transfer throughput over loopback gRPC for an
//! 8B-shaped KV (32 layers x 8 KV heads x 64 x f32 = 128 KiB per token, the
//! size of Llama-3-8B's bf16 KV) of random data, for 512, 2k and 8k-token
//! prompts. Run it in release:
//!
//! ```text
//! cargo test --release -p tandem --test transfer_throughput -- --ignored --nocapture
//! ```
//!
//! Each transfer is timed from the request to the assembled `KvExport`, both
//! sides in this process (server and client each on their own runtime).

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use rand::RngCore;
use tandem::engine::types::{SamplingParams, TokenOutput};
use tandem::infer::InferError;
use tandem::transfer::grpc::{server_builder, GrpcTransport, PrefillService, PrefillSource};
use tandem::transfer::pb::{KvDtype, KvLayout};
use tandem::transfer::{PrefillPart, RemotePrefillRequest, Transport};
use tokio_stream::wrappers::TcpListenerStream;

const LAYERS: u32 = 32;
const KV_HEADS: u32 = 8;
const HEAD_DIM: u32 = 64;
const BYTES_PER_TOKEN: usize = 2 * (LAYERS * KV_HEADS * HEAD_DIM) as usize * 4;

/// Ships pre-generated random KV of as many tokens as the prompt has.
struct RandomKv {
    /// One layer's K (or V) for the longest prompt; layers share it.
    data: Bytes,
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
        layout.set_dtype(KvDtype::F32);
        let side = self
            .data
            .slice(..tokens * BYTES_PER_TOKEN / (2 * LAYERS as usize));
        let layers = (0..LAYERS).map(move |index| {
            Ok(PrefillPart::Kv {
                layer: index,
                start_pos: 0,
                k: side.clone(),
                v: side.clone(),
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
    let sizes = [512usize, 2048, 8192];
    let max = *sizes.iter().max().unwrap();
    let mut data = vec![0u8; max * BYTES_PER_TOKEN / (2 * LAYERS as usize)];
    rand::rng().fill_bytes(&mut data);

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
            .add_service(PrefillService::server(RandomKv {
                data: Bytes::from(data),
            }))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );

    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let transport = {
        let _runtime = client_rt.enter();
        GrpcTransport::new(&addr, Duration::from_secs(60)).unwrap()
    };
    println!("KV transfer over loopback gRPC, {BYTES_PER_TOKEN} bytes/token ({LAYERS} layers x {KV_HEADS} KV heads x {HEAD_DIM} x f32, K and V)");
    println!(
        "{:>8} {:>10} {:>6} {:>10} {:>10} {:>8}",
        "tokens", "MiB", "runs", "best ms", "median ms", "GB/s"
    );
    for tokens in sizes {
        let runs = if tokens >= 8192 { 5 } else { 10 };
        let mut times = Vec::new();
        for run in 0..=runs {
            let request = RemotePrefillRequest {
                request_id: format!("bench-{tokens}-{run}"),
                prompt: vec![1; tokens],
                sampling: SamplingParams::greedy(),
            };
            let started = Instant::now();
            let got = client_rt.block_on(transport.prefill(request)).unwrap();
            let took = started.elapsed();
            assert_eq!(got.bytes, tokens * BYTES_PER_TOKEN);
            if run > 0 {
                // Run 0 warms the connection and the allocator.
                times.push(took);
            }
        }
        times.sort();
        let median = times[times.len() / 2];
        let bytes = (tokens * BYTES_PER_TOKEN) as f64;
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
