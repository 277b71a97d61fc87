//! The `cuda-ipc` mode of the `Prefill` RPC (docs/architecture.md, "KV
//! transfer"): for a prefill and a decode worker on the same node, the
//! prefill worker writes the prompt's KV straight into blocks of the decode
//! worker's GPU pool; only metadata travels in the RPC.
//!
//! The decode worker ([`super::client`]) reserves the blocks the prompt needs
//! in its own block manager and sends their ids with its pool's CUDA IPC
//! handle and geometry ([`pb::CudaIpcTarget`], made by [`target_to_pb`]) in
//! the `Prefill` request. The prefill worker ([`super::service`]) checks the
//! target ([`target_from_pb`]), maps the pool (once per peer), computes the
//! prompt, copies every layer's K and V of its blocks into the reserved ones
//! on the GPU, waits for the copy, and only then answers `KvWritten` and the
//! first token ([`engine_prefill_to_peer`]); the decode worker adopts the
//! blocks and generates. A prefill worker that cannot (other layout, no CUDA,
//! `--kv-transfer grpc`, the handle does not open) streams the KV in the
//! answer as usual and names the reason. Any failure drops the reservation,
//! which frees the blocks; the decode worker then retries or prefills
//! locally, as for a streamed transfer.
//!
//! Whether a decode worker offers its pool to a prefill worker is
//! [`choose`]n from both sides' node identity ([`node_id`]) and
//! capabilities, exchanged in their `Load` reports.

use futures::StreamExt;

use super::rpc::{PrefillPart, PrefillParts, RemotePrefillRequest};
use tandem_api::infer::InferError;
use tandem_api::pb;
use tandem_api::types::PrefillEvent;
use tandem_engine::backend::cuda::ipc::{
    KvPoolExport, KvPoolLayout, PeerKvTarget, PoolDtype, RankPool, IPC_HANDLE_BYTES,
};
use tandem_engine::EngineHandle;

pub use tandem_api::args::KvTransfer;

/// Which machine this process runs on, as far as cuda-ipc cares:
/// `TANDEM_NODE_NAME` when set (in Kubernetes, the pod's `spec.nodeName`
/// through the downward API), else the kernel's boot id (shared by every
/// process and container on one kernel, distinct across machines and VMs),
/// else the host name.
pub fn node_id() -> String {
    if let Ok(name) = std::env::var("TANDEM_NODE_NAME") {
        if !name.is_empty() {
            return format!("node:{name}");
        }
    }
    if let Ok(id) = std::fs::read_to_string("/proc/sys/kernel/random/boot_id") {
        let id = id.trim();
        if !id.is_empty() {
            return format!("boot:{id}");
        }
    }
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("host:{}", host.trim())
}

/// How the KV of one prefill worker's prefills comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Written into this decode worker's pool (the request offers blocks).
    CudaIpc,
    /// Streamed in the answer, and why not cuda-ipc (`None` when cuda-ipc
    /// was not wanted).
    Grpc(Option<String>),
}

/// Picks how the KV comes back from a prefill worker, from this decode worker's mode,
/// pool (`None` without CUDA) and node, and the prefill worker's last load
/// report. `Err` when `CudaIpc` is forced and impossible with this peer.
pub fn choose(
    mode: KvTransfer,
    own_pool: Option<&KvPoolExport>,
    own_node: &str,
    peer: Option<&pb::LoadResponse>,
) -> Result<Choice, String> {
    if mode == KvTransfer::Grpc {
        return Ok(Choice::Grpc(None));
    }
    let why_not = if own_pool.is_none() {
        Some("this decode worker's KV pool is not on a CUDA device".to_string())
    } else {
        match peer {
            None => Some("the prefill worker has not reported its load yet".to_string()),
            Some(load) if !load.cuda_ipc => Some(
                "the prefill worker does not take cuda-ipc (not CUDA, or --kv-transfer grpc)"
                    .to_string(),
            ),
            Some(load) if load.node_id != own_node => Some(format!(
                "the prefill worker runs on another node ({} here, {} there)",
                own_node, load.node_id
            )),
            Some(_) => None,
        }
    };
    match (why_not, mode) {
        (None, _) => Ok(Choice::CudaIpc),
        (Some(reason), KvTransfer::CudaIpc) => {
            Err(format!("--kv-transfer cuda-ipc is impossible: {reason}"))
        }
        (Some(reason), _) => Ok(Choice::Grpc(Some(reason))),
    }
}

fn dtype_to_pb(dtype: PoolDtype) -> pb::KvDtype {
    match dtype {
        PoolDtype::Bf16 => pb::KvDtype::Bf16,
    }
}

/// The request field offering `block_ids` of `pool`.
pub fn target_to_pb(pool: &KvPoolExport, block_ids: &[u32]) -> pb::CudaIpcTarget {
    let l = &pool.layout;
    let mut target = pb::CudaIpcTarget {
        mem_handle: pool.mem_handle.clone(),
        dtype: 0,
        block_size: l.block_size as u32,
        num_blocks: l.num_blocks as u32,
        num_layers: l.num_layers as u32,
        kv_heads: l.kv_heads as u32,
        head_dim: l.head_dim as u32,
        block_bytes: l.block_bytes as u64,
        plane_stride_bytes: l.plane_stride_bytes as u64,
        device: pool.device.clone(),
        block_ids: block_ids.to_vec(),
        other_ranks: pool
            .other_ranks
            .iter()
            .map(|r| pb::CudaIpcRank {
                mem_handle: r.mem_handle.clone(),
                device: r.device.clone(),
            })
            .collect(),
    };
    target.set_dtype(dtype_to_pb(l.dtype));
    target
}

/// The target a request offers, checked for what the wire can get wrong.
pub fn target_from_pb(t: pb::CudaIpcTarget) -> Result<PeerKvTarget, String> {
    let dtype = match t.dtype() {
        pb::KvDtype::Bf16 => PoolDtype::Bf16,
        other => {
            return Err(format!(
                "the decode worker's pool holds {}; cuda-ipc copies bf16 pools",
                other.as_str_name()
            ))
        }
    };
    let handles = std::iter::once(&t.mem_handle).chain(t.other_ranks.iter().map(|r| &r.mem_handle));
    if let Some((rank, h)) = handles
        .enumerate()
        .find(|(_, h)| h.len() != IPC_HANDLE_BYTES)
    {
        return Err(format!(
            "an IPC handle of {} bytes for rank {rank} (expected {IPC_HANDLE_BYTES})",
            h.len()
        ));
    }
    let layout = KvPoolLayout {
        dtype,
        block_size: t.block_size as usize,
        num_blocks: t.num_blocks as usize,
        num_layers: t.num_layers as usize,
        kv_heads: t.kv_heads as usize,
        head_dim: t.head_dim as usize,
        block_bytes: t.block_bytes as usize,
        plane_stride_bytes: t.plane_stride_bytes as usize,
    };
    layout.check()?;
    if let Some(b) = t.block_ids.iter().find(|&&b| b >= t.num_blocks) {
        return Err(format!(
            "block {b} is outside the decode worker's pool of {} blocks",
            t.num_blocks
        ));
    }
    Ok(PeerKvTarget {
        pool: KvPoolExport {
            mem_handle: t.mem_handle,
            device: t.device,
            layout,
            other_ranks: t
                .other_ranks
                .into_iter()
                .map(|r| RankPool {
                    mem_handle: r.mem_handle,
                    device: r.device,
                })
                .collect(),
        },
        block_ids: t.block_ids,
    })
}

/// The prefill side: maps the decode worker's pool, prefills `request` with
/// its KV written there, and yields `KvWritten` then the first token. `Err`
/// (before any work) says why cuda-ipc cannot be used with this request.
pub async fn engine_prefill_to_peer(
    engine: EngineHandle,
    request: RemotePrefillRequest,
    target: pb::CudaIpcTarget,
) -> Result<PrefillParts, String> {
    let target = target_from_pb(target)?;
    engine.open_peer_kv(target.pool.clone()).await?;
    let stream = engine
        .prefill_stream_to_peer(request.prompt, request.sampling, target)
        .map_err(|e| e.to_string())?;
    let parts = futures::stream::unfold(Some((stream, 0usize, 0usize)), |state| async move {
        let (mut stream, mut prompt_tokens, mut cached_tokens) = state?;
        loop {
            let part = match stream.next_event().await {
                None => Err(InferError::Unavailable(
                    "the engine stopped during prefill".into(),
                )),
                Some(PrefillEvent::Started {
                    prompt_tokens: p,
                    cached_tokens: c,
                }) => {
                    (prompt_tokens, cached_tokens) = (p, c);
                    continue;
                }
                Some(PrefillEvent::PeerWritten(w)) => Ok(PrefillPart::KvWritten(pb::KvWritten {
                    num_tokens: prompt_tokens as u32,
                    cached_tokens: cached_tokens as u32,
                    bytes: w.bytes as u64,
                    copy_seconds: w.seconds,
                })),
                Some(PrefillEvent::Done(token)) => {
                    return Some((Ok(PrefillPart::FirstToken(token)), None))
                }
                Some(PrefillEvent::Error(e)) => Err(InferError::Unavailable(e)),
                Some(PrefillEvent::Kv(_)) => Err(InferError::Unavailable(
                    "a prefill into a peer's pool streamed KV".into(),
                )),
            };
            let next = part
                .is_ok()
                .then_some((stream, prompt_tokens, cached_tokens));
            return Some((part, next));
        }
    });
    Ok(parts.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> KvPoolExport {
        let block_bytes = 16 * 3 * 64 * 2;
        KvPoolExport {
            mem_handle: (0..64).collect(),
            device: "0000:19:00.0".into(),
            layout: KvPoolLayout {
                dtype: PoolDtype::Bf16,
                block_size: 16,
                num_blocks: 40,
                num_layers: 30,
                kv_heads: 3,
                head_dim: 64,
                block_bytes,
                plane_stride_bytes: 40 * block_bytes,
            },
            other_ranks: Vec::new(),
        }
    }

    fn load(node: &str, cuda_ipc: bool) -> pb::LoadResponse {
        pb::LoadResponse {
            node_id: node.into(),
            cuda_ipc,
            ..pb::LoadResponse::default()
        }
    }

    #[test]
    fn auto_picks_cuda_ipc_only_for_a_cuda_peer_on_the_same_node() {
        let p = pool();
        let auto = KvTransfer::Auto;
        assert_eq!(
            choose(auto, Some(&p), "boot:a", Some(&load("boot:a", true))),
            Ok(Choice::CudaIpc)
        );
        let other_node = choose(auto, Some(&p), "boot:a", Some(&load("boot:b", true))).unwrap();
        assert!(
            matches!(&other_node, Choice::Grpc(Some(r)) if r.contains("another node")),
            "{other_node:?}"
        );
        let no_cuda_peer = choose(auto, Some(&p), "boot:a", Some(&load("boot:a", false))).unwrap();
        assert!(
            matches!(&no_cuda_peer, Choice::Grpc(Some(r)) if r.contains("does not take cuda-ipc")),
            "{no_cuda_peer:?}"
        );
        let no_cuda_here = choose(auto, None, "boot:a", Some(&load("boot:a", true))).unwrap();
        assert!(
            matches!(&no_cuda_here, Choice::Grpc(Some(r)) if r.contains("not on a CUDA device")),
            "{no_cuda_here:?}"
        );
        assert!(matches!(
            choose(auto, Some(&p), "boot:a", None),
            Ok(Choice::Grpc(Some(_)))
        ));
        assert_eq!(
            choose(
                KvTransfer::Grpc,
                Some(&p),
                "boot:a",
                Some(&load("boot:a", true))
            ),
            Ok(Choice::Grpc(None))
        );
    }

    #[test]
    fn forced_cuda_ipc_refuses_a_peer_it_cannot_use_and_says_why() {
        let p = pool();
        let forced = KvTransfer::CudaIpc;
        assert_eq!(
            choose(forced, Some(&p), "n", Some(&load("n", true))),
            Ok(Choice::CudaIpc)
        );
        let err = choose(forced, Some(&p), "n", Some(&load("m", true))).unwrap_err();
        assert!(
            err.contains("--kv-transfer cuda-ipc is impossible"),
            "{err}"
        );
        assert!(err.contains("another node (n here, m there)"), "{err}");
    }

    #[test]
    fn targets_survive_the_wire_and_bad_ones_are_named() {
        let p = pool();
        let wire = target_to_pb(&p, &[3, 9, 1]);
        let back = target_from_pb(wire.clone()).unwrap();
        assert_eq!(back.pool, p);
        assert_eq!(back.block_ids, vec![3, 9, 1]);

        let mut outside = wire.clone();
        outside.block_ids.push(40);
        let err = target_from_pb(outside).unwrap_err();
        assert!(err.contains("block 40 is outside"), "{err}");
        let mut f32_pool = wire.clone();
        f32_pool.set_dtype(pb::KvDtype::F32);
        let err = target_from_pb(f32_pool).unwrap_err();
        assert!(err.contains("KV_DTYPE_F32"), "{err}");
        let mut short_handle = wire.clone();
        short_handle.mem_handle.truncate(10);
        assert!(target_from_pb(short_handle)
            .unwrap_err()
            .contains("10 bytes"));
        let mut inconsistent = wire;
        inconsistent.block_bytes = 100;
        assert!(target_from_pb(inconsistent)
            .unwrap_err()
            .contains("block_bytes"));
    }

    #[test]
    fn a_tensor_parallel_pool_carries_one_handle_per_rank_over_the_wire() {
        let mut group = pool();
        group.layout.kv_heads = 1;
        group.layout.block_bytes = 16 * 64 * 2;
        group.layout.plane_stride_bytes = 40 * group.layout.block_bytes;
        group.other_ranks = vec![
            RankPool {
                mem_handle: vec![7; IPC_HANDLE_BYTES],
                device: "0000:3b:00.0".into(),
            },
            RankPool {
                mem_handle: vec![9; IPC_HANDLE_BYTES],
                device: "0000:4c:00.0".into(),
            },
        ];
        let wire = target_to_pb(&group, &[5, 6]);
        assert_eq!(wire.other_ranks.len(), 2);
        let back = target_from_pb(wire.clone()).unwrap();
        assert_eq!(back.pool, group);
        assert_eq!(back.pool.ranks(), 3);
        assert_eq!(
            back.pool.rank(2).unwrap().mem_handle,
            vec![9; IPC_HANDLE_BYTES]
        );
        assert_eq!(back.pool.rank(1).unwrap().device, "0000:3b:00.0");

        let mut bad_rank = wire;
        bad_rank.other_ranks[1].mem_handle.truncate(3);
        let err = target_from_pb(bad_rank).unwrap_err();
        assert!(err.contains("3 bytes for rank 2"), "{err}");
    }
}
