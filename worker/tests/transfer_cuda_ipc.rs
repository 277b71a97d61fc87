//! The decode side of the cuda-ipc mode of `Prefill` without a GPU: the blocks it
//! reserves for a prefill worker to write into are adopted when the worker
//! says it wrote them, and freed when the worker dies mid-copy or declines
//! (then the KV arrives streamed). The GPU copy itself is checked on the
//! GPU machine (`tandem gpu transfer-bench`).

mod engine_support;
mod transfer_support;

use std::time::Duration;

use engine_support::*;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::StreamExt;
use tandem_api::infer::{Infer, InferError};
use tandem_api::types::{GenerateRequest, SamplingParams, StopParams, TokenOutput};
use tandem_disagg::transfer::client::{IpcPrefill, PrefillClient};
use tandem_disagg::transfer::pb;
use tandem_disagg::transfer::service::PrefillSource;
use tandem_disagg::transfer::{PrefillPart, PrefillParts, RemotePrefillRequest, TransferError};
use tandem_engine::backend::cuda::ipc::{KvPoolExport, KvPoolLayout, PoolDtype};
use tandem_engine::backend::{CpuBackend, WeightStorage};
use tandem_engine::{Engine, EngineConfig, EngineHandle};
use tandem_model::{ModelConfig, Weights};
use transfer_support::{serve_killable, tokens};

const BLOCK: usize = 4;

fn engine(cfg: &ModelConfig, weights: &Weights) -> EngineHandle {
    let backend = CpuBackend::new(cfg.clone(), weights, WeightStorage::F32).unwrap();
    let ecfg = EngineConfig {
        block_size: BLOCK,
        num_blocks: Some(64),
        max_batch_tokens: 32,
        max_num_seqs: 8,
        max_queue: 16,
        threads: 2,
        ..EngineConfig::default()
    };
    Engine::start(Box::new(backend), ecfg, vec![0], 256, "test").unwrap()
}

/// A made-up export of the decode engine's pool: the fake prefill sources
/// never map it.
fn pool(cfg: &ModelConfig) -> KvPoolExport {
    let block_bytes = BLOCK * cfg.num_kv_heads * cfg.head_dim * 2;
    KvPoolExport {
        mem_handle: vec![1; 64],
        device: "0000:00:00.0".into(),
        layout: KvPoolLayout {
            dtype: PoolDtype::Bf16,
            block_size: BLOCK,
            num_blocks: 64,
            num_layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_bytes,
            plane_stride_bytes: 64 * block_bytes,
        },
        other_ranks: Vec::new(),
    }
}

fn prompt(len: usize) -> Vec<u32> {
    (0..len as u32).map(|i| 1 + (i * 31 + 7) % 90).collect()
}

fn request(p: &[u32]) -> RemotePrefillRequest {
    RemotePrefillRequest {
        request_id: "r".into(),
        prompt: p.to_vec(),
        sampling: SamplingParams::greedy(),
    }
}

/// A prefill worker that takes cuda-ipc requests and either reports the KV
/// written (and the first token 5) or stalls forever mid-copy.
struct FakeIpcPrefill {
    stall: bool,
}

impl PrefillSource for FakeIpcPrefill {
    fn prefill_parts(&self, _: RemotePrefillRequest) -> PrefillParts {
        futures::stream::iter([Err(InferError::Unavailable("streaming not faked".into()))]).boxed()
    }

    fn prefill_to_peer(
        &self,
        request: RemotePrefillRequest,
        target: pb::CudaIpcTarget,
    ) -> BoxFuture<'static, Result<PrefillParts, String>> {
        let stall = self.stall;
        Box::pin(async move {
            assert_eq!(
                target.block_ids.len(),
                request.prompt.len().div_ceil(BLOCK),
                "one reserved block per started block of the prompt"
            );
            let parts: BoxStream<'static, Result<PrefillPart, InferError>> = if stall {
                futures::stream::pending().boxed()
            } else {
                futures::stream::iter([
                    Ok(PrefillPart::KvWritten(pb::KvWritten {
                        num_tokens: request.prompt.len() as u32,
                        cached_tokens: 0,
                        bytes: 1234,
                        copy_seconds: 0.001,
                    })),
                    Ok(PrefillPart::FirstToken(TokenOutput {
                        id: 5,
                        logprob: None,
                        top_logprobs: vec![],
                    })),
                ])
                .boxed()
            };
            Ok(parts)
        })
    }
}

/// Waits until the engine reports `used` KV blocks in use.
async fn blocks_used_becomes(engine: &EngineHandle, used: usize) {
    for _ in 0..200 {
        if engine.stats().kv_blocks_used == used {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "{} KV blocks in use, expected {used}",
        engine.stats().kv_blocks_used
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_reserved_for_a_prefill_worker_that_dies_mid_copy_are_freed() {
    let cfg = tiny_config(GQA);
    let decode = engine(&cfg, &random_weights(&cfg, 3));
    let (addr, server) = serve_killable(FakeIpcPrefill { stall: true }, None);
    let client = PrefillClient::new(&addr, Duration::from_secs(30)).unwrap();
    let p = prompt(21);
    let export = pool(&cfg);
    let fetch = {
        let (decode, export, p) = (decode.clone(), export.clone(), p.clone());
        tokio::spawn(async move {
            client
                .prefill_via_cuda_ipc_into(&decode, &export, request(&p))
                .await
        })
    };
    // 21 tokens in blocks of 4: six blocks held while the copy is under way.
    blocks_used_becomes(&decode, 6).await;
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
    let err = match fetch.await.unwrap() {
        Err(e) => e,
        Ok(_) => panic!("a dead prefill worker's transfer succeeded"),
    };
    assert!(
        matches!(
            err,
            TransferError::Connection { .. } | TransferError::Incomplete(_)
        ),
        "{err}"
    );
    blocks_used_becomes(&decode, 0).await;
    // The prompt is then served locally, as for gRPC.
    let local = tokens(
        decode
            .generate(GenerateRequest {
                id: "local".into(),
                prompt: p,
                sampling: SamplingParams::greedy(),
                stop: StopParams {
                    max_tokens: 4,
                    stop_token_ids: vec![],
                    ignore_eos: true,
                },
            })
            .unwrap(),
    )
    .await;
    assert_eq!(local.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_blocks_are_adopted_decoded_from_and_freed_at_the_end() {
    let cfg = tiny_config(GQA);
    let decode = engine(&cfg, &random_weights(&cfg, 3));
    let (addr, server) = serve_killable(FakeIpcPrefill { stall: false }, None);
    let client = PrefillClient::new(&addr, Duration::from_secs(30)).unwrap();
    let p = prompt(16);
    let fetched = client
        .prefill_via_cuda_ipc_into(&decode, &pool(&cfg), request(&p))
        .await
        .unwrap();
    let IpcPrefill::Written {
        reservation,
        first_token,
        written,
    } = fetched
    else {
        panic!("the fake prefill worker wrote the KV")
    };
    assert_eq!((written.bytes, first_token.id), (1234, 5));
    assert_eq!(reservation.block_ids().len(), 4);
    let reserved = reservation.block_ids().to_vec();
    blocks_used_becomes(&decode, 4).await;
    let stream = decode
        .generate_with_reserved(
            GenerateRequest {
                id: "adopted".into(),
                prompt: p,
                sampling: SamplingParams::greedy(),
                stop: StopParams {
                    max_tokens: 3,
                    stop_token_ids: vec![],
                    ignore_eos: true,
                },
            },
            reservation,
            first_token,
        )
        .unwrap();
    let out = tokens(stream).await;
    assert_eq!(out.len(), 3);
    assert_eq!(out[0], 5, "the prefill worker's first token comes first");
    blocks_used_becomes(&decode, 0).await;
    // The adopted prompt blocks joined the prefix cache (4 full blocks).
    assert!(decode.stats().kv_blocks_cached >= reserved.len());
    tokio::task::spawn_blocking(move || drop(server))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_that_declines_streams_the_kv_and_says_why() {
    let cfg = tiny_config(GQA);
    let w = random_weights(&cfg, 3);
    let decode = engine(&cfg, &w);
    let p = prompt(9);
    // A CPU prefill engine cannot map a GPU pool; one with --kv-transfer
    // grpc does not try.
    for (off, reason) in [
        (
            None,
            "the cpu backend cannot write KV into another worker's pool",
        ),
        (
            Some("this prefill worker runs with --kv-transfer grpc".to_string()),
            "--kv-transfer grpc",
        ),
    ] {
        let (addr, server) = serve_killable(engine(&cfg, &w), off);
        let client = PrefillClient::new(&addr, Duration::from_secs(30)).unwrap();
        let fetched = client
            .prefill_via_cuda_ipc_into(&decode, &pool(&cfg), request(&p))
            .await
            .unwrap();
        let IpcPrefill::Streamed(remote) = fetched else {
            panic!("a CPU prefill worker wrote into a GPU pool")
        };
        let declined = remote.cuda_ipc_declined.clone().unwrap_or_default();
        assert!(declined.contains(reason), "{declined}");
        assert_eq!(remote.kv.num_tokens, 9);
        blocks_used_becomes(&decode, 0).await;
        let out = tokens(
            decode
                .generate_with_kv(
                    GenerateRequest {
                        id: "streamed".into(),
                        prompt: p.clone(),
                        sampling: SamplingParams::greedy(),
                        stop: StopParams {
                            max_tokens: 2,
                            stop_token_ids: vec![],
                            ignore_eos: true,
                        },
                    },
                    remote.kv,
                    remote.first_token,
                )
                .unwrap(),
        )
        .await;
        assert_eq!(out.len(), 2);
        tokio::task::spawn_blocking(move || drop(server))
            .await
            .unwrap();
    }
}
