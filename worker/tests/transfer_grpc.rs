//! `Prefill` with the KV streamed over gRPC on loopback, with a random tiny model: what the
//! decode side receives is the prefill engine's export bit for bit, and
//! decoding from it gives the tokens the prefill engine gives in place.

mod engine_support;
mod transfer_support;

use engine_support::*;
use tandem_api::infer::Infer;
use tandem_api::metrics::metrics;
use tandem_api::types::{GenerateRequest, SamplingParams, StopParams};
use tandem_disagg::transfer::channel::server_builder;
use tandem_disagg::transfer::client::PrefillClient;
use tandem_disagg::transfer::service::PrefillService;
use tandem_disagg::transfer::{RemotePrefillRequest, TransferError};
use tandem_engine::backend::{CpuBackend, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::{ModelConfig, Weights};
use tokio_stream::wrappers::TcpListenerStream;
use transfer_support::tokens;

use std::time::Duration;

fn engine(cfg: &ModelConfig, weights: &Weights, block_size: usize) -> EngineHandle {
    let backend = CpuBackend::new(cfg.clone(), weights, WeightStorage::F32).unwrap();
    let ecfg = EngineConfig {
        block_size,
        num_blocks: Some(64),
        max_batch_tokens: 32,
        max_num_seqs: 8,
        max_queue: 16,
        threads: 2,
        ..EngineConfig::default()
    };
    Engine::start(Box::new(backend), ecfg, vec![0], 256, "test").unwrap()
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 1 + (i * 29 + seed * 13 + i * i * seed) % 95)
        .collect()
}

fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        id: "t".into(),
        prompt,
        sampling: SamplingParams::greedy(),
        stop: StopParams {
            max_tokens,
            stop_token_ids: vec![],
            ignore_eos: true,
        },
    }
}

/// Serves `Prefill` for `engine` on a loopback port; returns its address.
async fn serve(engine: EngineHandle) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        server_builder()
            .add_service(PrefillService::server(engine))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

/// The transfer metrics are process-wide and tests run in parallel: tests that
/// ship KV hold this so byte counts seen by one are its own.
static SHIPPING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn counter(role: &str, direction: &str) -> u64 {
    metrics()
        .kv_transfer_bytes
        .with_label_values(&[role, direction, "grpc"])
        .get()
}

fn transfers(role: &str, direction: &str) -> u64 {
    metrics()
        .kv_transfer_seconds
        .with_label_values(&[role, direction, "grpc"])
        .get_sample_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_prefill_ships_the_exact_kv_and_decoding_continues_identically() {
    let _shipping = SHIPPING.lock().await;
    let cfg = tiny_config(GQA);
    let w = random_weights(&cfg, 5);
    let prefill = engine(&cfg, &w, 4);
    let decode = engine(&cfg, &w, 16);
    let client =
        PrefillClient::new(&serve(prefill.clone()).await, Duration::from_secs(30)).unwrap();
    let bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4;
    let (sent0, received0) = (counter("prefill", "sent"), counter("decode", "received"));
    let mut shipped = 0;

    for (i, len) in [1usize, 7, 33, 120].into_iter().enumerate() {
        let p = prompt(i as u32 + 3, len);
        let in_place = tokens(prefill.generate(request(p.clone(), 10)).unwrap()).await;
        let local = prefill
            .prefill_only(p.clone(), SamplingParams::greedy())
            .await
            .unwrap();
        let remote = client
            .prefill(RemotePrefillRequest {
                request_id: format!("r{i}"),
                prompt: p.clone(),
                sampling: SamplingParams::greedy(),
            })
            .await
            .unwrap();

        assert_eq!(remote.kv.num_tokens, len);
        assert_eq!(remote.kv.num_layers, cfg.num_layers);
        remote.kv.check().unwrap();
        let received = remote.kv.to_export();
        for (layer, (got, want)) in received.layers.iter().zip(&local.kv.layers).enumerate() {
            let bits = |x: &Vec<f32>| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert!(
                bits(&got.0) == bits(&want.0),
                "K of layer {layer}, {len} tokens"
            );
            assert!(
                bits(&got.1) == bits(&want.1),
                "V of layer {layer}, {len} tokens"
            );
        }
        assert_eq!(remote.first_token, local.first_token);
        assert_eq!(remote.first_token.id, in_place[0]);
        // The prompt was computed twice before: every full block is cached.
        assert_eq!(remote.cached_tokens, local.cached_tokens);
        assert_eq!(remote.bytes, bytes_per_token * len);
        shipped += remote.bytes;

        let continued = tokens(
            decode
                .generate_with_kv(request(p, 10), remote.kv, remote.first_token)
                .unwrap(),
        )
        .await;
        assert_eq!(continued, in_place, "prompt of {len} tokens");
    }
    assert_eq!(counter("prefill", "sent") - sent0, shipped as u64);
    assert_eq!(counter("decode", "received") - received0, shipped as u64);
    assert!(transfers("prefill", "sent") >= 4);
    assert!(transfers("decode", "received") >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_the_prefill_engine_refuses_is_a_remote_error() {
    let cfg = tiny_config(GQA);
    let w = random_weights(&cfg, 5);
    let addr = serve(engine(&cfg, &w, 4)).await;
    let client = PrefillClient::new(&addr, Duration::from_secs(30)).unwrap();
    let err = client
        .prefill(RemotePrefillRequest {
            request_id: "bad".into(),
            prompt: vec![1, 2, 5000],
            sampling: SamplingParams::greedy(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Remote { .. }), "{err:?}");
    assert!(err.to_string().contains("5000"), "{err}");
}

#[tokio::test]
async fn an_unreachable_prefill_worker_is_a_connection_error() {
    // Bind and drop a listener so the port is (almost surely) closed.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let client = PrefillClient::new(&format!("http://{addr}"), Duration::from_secs(5)).unwrap();
    let err = client
        .prefill(RemotePrefillRequest {
            request_id: "x".into(),
            prompt: vec![1],
            sampling: SamplingParams::greedy(),
        })
        .await
        .unwrap_err();
    assert!(matches!(err, TransferError::Connection { .. }), "{err:?}");
    assert!(PrefillClient::new("not a url", Duration::from_secs(1)).is_err());
}

/// A fresh 100-token prompt against an engine that prefills 32 tokens per
/// step: the KV of four prefill chunks arrives complete and exactly as
/// computed in place, each byte once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_of_several_prefill_chunks_arrives_intact() {
    let _shipping = SHIPPING.lock().await;
    let cfg = tiny_config(GQA);
    let w = random_weights(&cfg, 11);
    let prefill = engine(&cfg, &w, 4);
    let client =
        PrefillClient::new(&serve(prefill.clone()).await, Duration::from_secs(30)).unwrap();
    let p = prompt(17, 100);
    let remote = client
        .prefill(RemotePrefillRequest {
            request_id: "long".into(),
            prompt: p.clone(),
            sampling: SamplingParams::greedy(),
        })
        .await
        .unwrap();
    assert_eq!(remote.cached_tokens, 0, "the prompt was new to the engine");
    let in_place = prefill
        .prefill_only(p.clone(), SamplingParams::greedy())
        .await
        .unwrap();
    let bits = |x: &Vec<f32>| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    let received = remote.kv.to_export();
    for (layer, (got, want)) in received.layers.iter().zip(&in_place.kv.layers).enumerate() {
        assert!(bits(&got.0) == bits(&want.0), "K of layer {layer}");
        assert!(bits(&got.1) == bits(&want.1), "V of layer {layer}");
    }
    assert_eq!(remote.first_token, in_place.first_token);
    let bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4;
    assert_eq!(remote.bytes, bytes_per_token * 100);
}

/// KV leaves while the prefill still computes: on the wire, every layer of
/// the first 32-token prefill chunk comes before layer 0 of the next one
/// (which the engine computes only after the first chunk's last layer), and
/// the first token comes last. Shipping after the whole prompt, layer by
/// layer, would send layer 0 of every position first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_of_the_first_prefill_chunk_is_sent_before_the_next_chunk_is_computed() {
    let _shipping = SHIPPING.lock().await;
    use tandem_disagg::transfer::pb::{prefill_client, prefill_response::Part};
    use tandem_disagg::transfer::rpc::sampling_to_pb;

    let cfg = tiny_config(GQA);
    let w = random_weights(&cfg, 13);
    let addr = serve(engine(&cfg, &w, 4)).await;
    let mut client = prefill_client::PrefillClient::connect(addr).await.unwrap();
    let mut stream = client
        .prefill(tandem_disagg::transfer::pb::PrefillRequest {
            request_id: "order".into(),
            prompt: prompt(19, 100),
            sampling: Some(sampling_to_pb(&SamplingParams::greedy())),
            cuda_ipc: None,
        })
        .await
        .unwrap()
        .into_inner();

    let mut parts = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        parts.push(message.part.unwrap());
    }
    assert!(matches!(parts.first(), Some(Part::Layout(_))));
    assert!(matches!(parts.last(), Some(Part::FirstToken(_))));
    let chunks: Vec<(u32, u32, u32)> = parts[1..parts.len() - 1]
        .iter()
        .map(|p| match p {
            Part::Chunk(c) => (c.layer, c.start_pos, c.num_tokens),
            other => panic!("a {other:?} among the KV chunks"),
        })
        .collect();
    let last_layer = cfg.num_layers as u32 - 1;
    let first_chunk_done = chunks
        .iter()
        .position(|&(l, s, _)| l == last_layer && s == 0)
        .expect("the last layer of positions 0..32");
    let second_chunk_starts = chunks
        .iter()
        .position(|&(l, s, _)| l == 0 && s == 32)
        .expect("layer 0 of positions 32..64");
    assert!(first_chunk_done < second_chunk_starts, "{chunks:?}");
    // Each (layer, position) exactly once, in 32-token steps.
    let mut seen = vec![0u32; cfg.num_layers * 100];
    for &(l, s, n) in &chunks {
        assert!(n <= 32, "{chunks:?}");
        for pos in s..s + n {
            seen[l as usize * 100 + pos as usize] += 1;
        }
    }
    assert!(seen.iter().all(|&c| c == 1), "{chunks:?}");
}
