//! The device side of the `cuda-ipc` KV transport (docs/architecture.md, "KV transfer").
//!
//! A decode worker exports its KV pool as a CUDA IPC memory handle plus the
//! pool's geometry ([`KvPoolExport`]). A prefill worker on the same node
//! opens that handle once per peer (`PeerWriter`, cached; peer access
//! between two GPUs is enabled by the open) and, when a prompt is computed,
//! copies its blocks straight into the blocks the decode worker reserved,
//! with one kernel on its own stream that reads its pool and writes the
//! peer's (over NVLink between GPUs). The copy has finished when
//! `PeerWriter::write` returns: the caller signals completion only after.
//!
//! The pool is one `cuMemAlloc` allocation (IPC needs that; stream-ordered
//! pool allocations cannot be exported this way).

use std::collections::HashMap;

use cudarc::driver::sys as drv_sys;
use cudarc::driver::CudaFunction;
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::device::{alloc, Dev, Gpu};
use super::launch::PeerCopy;
use super::CudaError;

/// Bytes of a `CUipcMemHandle`.
pub const IPC_HANDLE_BYTES: usize = 64;

/// Element type of a KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolDtype {
    Bf16,
}

impl PoolDtype {
    pub fn size(self) -> usize {
        match self {
            PoolDtype::Bf16 => 2,
        }
    }
}

/// Where each block of a KV pool lies. Planes `p = 2 * layer + (0 for K, 1
/// for V)` start `p * plane_stride_bytes` from the allocation's base; block
/// `b` of a plane starts `b * block_bytes` into it and holds `[block_size,
/// kv_heads, head_dim]` elements of `dtype`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPoolLayout {
    pub dtype: PoolDtype,
    pub block_size: usize,
    pub num_blocks: usize,
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_bytes: usize,
    pub plane_stride_bytes: usize,
}

impl KvPoolLayout {
    /// Bytes of K and V of all layers in `blocks` blocks.
    pub fn bytes_for_blocks(&self, blocks: usize) -> usize {
        2 * self.num_layers * blocks * self.block_bytes
    }

    /// Checks that the geometry is self-consistent and that the copy kernel
    /// can move its blocks (16-byte units).
    pub fn check(&self) -> Result<(), String> {
        let expected = self.block_size * self.kv_heads * self.head_dim * self.dtype.size();
        if expected == 0 || self.block_bytes != expected {
            return Err(format!(
                "block_bytes {} does not match block_size {} x kv_heads {} x head_dim {} x {} bytes",
                self.block_bytes,
                self.block_size,
                self.kv_heads,
                self.head_dim,
                self.dtype.size()
            ));
        }
        if self.plane_stride_bytes < self.num_blocks * self.block_bytes {
            return Err(format!(
                "a plane stride of {} bytes cannot hold {} blocks of {} bytes",
                self.plane_stride_bytes, self.num_blocks, self.block_bytes
            ));
        }
        if !self.block_bytes.is_multiple_of(16) || !self.plane_stride_bytes.is_multiple_of(16) {
            return Err(format!(
                "blocks of {} bytes and planes of {} bytes are not whole 16-byte units",
                self.block_bytes, self.plane_stride_bytes
            ));
        }
        Ok(())
    }

    /// Whether blocks of this (the sender's) pool can be copied as they are
    /// into `dest`'s blocks; `Err` names the first difference.
    pub fn compatible_with(&self, dest: &KvPoolLayout) -> Result<(), String> {
        dest.check()
            .map_err(|e| format!("the receiving pool: {e}"))?;
        let pairs = [
            ("block size", self.block_size, dest.block_size),
            ("layers", self.num_layers, dest.num_layers),
            ("kv heads", self.kv_heads, dest.kv_heads),
            ("head dim", self.head_dim, dest.head_dim),
        ];
        if let Some((what, mine, theirs)) = pairs.iter().find(|(_, a, b)| a != b) {
            return Err(format!(
                "{what} differs: {mine} here, {theirs} in the receiving pool"
            ));
        }
        if self.dtype != dest.dtype {
            return Err(format!(
                "dtype differs: {:?} here, {:?} in the receiving pool",
                self.dtype, dest.dtype
            ));
        }
        Ok(())
    }
}

/// A KV pool as another process on the same node can map it.
///
/// A tensor-parallel worker's pool is one allocation per GPU (rank), each
/// holding that rank's KV heads of every block: `mem_handle` and `device`
/// are rank 0's, `other_ranks` ranks 1.. in order, and `layout` is one
/// rank's (its `kv_heads` are a rank's share). A prefill group of the same
/// size copies rank `r`'s heads into rank `r`'s pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvPoolExport {
    /// The `CUipcMemHandle` of the pool's allocation.
    pub mem_handle: Vec<u8>,
    /// PCI bus id of the pool's GPU.
    pub device: String,
    pub layout: KvPoolLayout,
    /// Ranks 1.. of a tensor-parallel group's pool; empty for one GPU.
    pub other_ranks: Vec<RankPool>,
}

/// One rank's allocation of a tensor-parallel group's pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankPool {
    /// The `CUipcMemHandle` of the rank's allocation.
    pub mem_handle: Vec<u8>,
    /// PCI bus id of the rank's GPU.
    pub device: String,
}

impl KvPoolExport {
    /// GPUs the pool is split over (the exporting worker's tensor-parallel size).
    pub fn ranks(&self) -> usize {
        1 + self.other_ranks.len()
    }

    /// Rank `rank`'s allocation alone, as a one-GPU pool of `layout`.
    pub fn rank(&self, rank: usize) -> Option<KvPoolExport> {
        let (mem_handle, device) = match rank {
            0 => (self.mem_handle.clone(), self.device.clone()),
            r => {
                let p = self.other_ranks.get(r - 1)?;
                (p.mem_handle.clone(), p.device.clone())
            }
        };
        Some(KvPoolExport {
            mem_handle,
            device,
            layout: self.layout.clone(),
            other_ranks: Vec::new(),
        })
    }

    /// A group's pool from every rank's own export (rank order); `Err` when
    /// they differ in geometry (they must hold the same blocks).
    pub fn from_ranks(ranks: Vec<KvPoolExport>) -> Result<KvPoolExport, String> {
        let mut ranks = ranks.into_iter();
        let mut group = ranks.next().ok_or("a group of no ranks")?;
        for (i, r) in ranks.enumerate() {
            if r.layout != group.layout {
                return Err(format!(
                    "rank {}'s KV pool {:?} differs from rank 0's {:?}",
                    i + 1,
                    r.layout,
                    group.layout
                ));
            }
            group.other_ranks.push(RankPool {
                mem_handle: r.mem_handle,
                device: r.device,
            });
        }
        Ok(group)
    }
}

/// Checks that a prefill worker on `here` GPUs can copy into `pool` rank by
/// rank: cuda-ipc between tensor-parallel groups needs groups of equal size
/// (each rank holds the same share of the heads on both sides).
pub fn check_ranks(here: usize, pool: &KvPoolExport) -> Result<(), String> {
    let there = pool.ranks();
    if here == there {
        return Ok(());
    }
    let gpus = |n: usize| match n {
        1 => "one GPU".to_string(),
        n => format!("{n} GPUs (--tensor-parallel-size {n})"),
    };
    Err(format!(
        "the decode worker's KV pool is split over {}, this prefill worker's over {}: cuda-ipc \
         copies rank by rank and needs tensor-parallel groups of equal size",
        gpus(there),
        gpus(here)
    ))
}

/// Blocks of a peer's pool to write a prompt's KV into, in position order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKvTarget {
    pub pool: KvPoolExport,
    pub block_ids: Vec<u32>,
}

pub use tandem_api::types::PeerWrite;

/// Checks a copy of `num_tokens` positions from `src_blocks` into `target`
/// before anything runs; returns the number of blocks to copy.
pub fn check_copy(
    local: &KvPoolLayout,
    src_blocks: &[u32],
    num_tokens: usize,
    target: &PeerKvTarget,
) -> Result<usize, String> {
    check_ranks(1, &target.pool)?;
    local.compatible_with(&target.pool.layout)?;
    let blocks = num_tokens.div_ceil(local.block_size);
    if src_blocks.len() < blocks || target.block_ids.len() < blocks {
        return Err(format!(
            "{num_tokens} tokens need {blocks} blocks; the prompt holds {} here and {} were reserved",
            src_blocks.len(),
            target.block_ids.len()
        ));
    }
    if let Some(b) = src_blocks[..blocks]
        .iter()
        .find(|&&b| b as usize >= local.num_blocks)
    {
        return Err(format!(
            "source block {b} is outside this pool of {}",
            local.num_blocks
        ));
    }
    let dest = &target.pool.layout;
    if let Some(b) = target.block_ids[..blocks]
        .iter()
        .find(|&&b| b as usize >= dest.num_blocks)
    {
        return Err(format!(
            "reserved block {b} is outside the receiving pool of {}",
            dest.num_blocks
        ));
    }
    Ok(blocks)
}

/// The copy kernel's source, compiled on first use of cuda-ipc.
const COPY_KERNEL: &str = include_str!("../../../kernels/peer_copy.cu");

/// The IPC handle and identity of a pool allocated at `base` on `gpu`.
pub(super) fn export_pool(
    gpu: &Gpu,
    base: u64,
    layout: KvPoolLayout,
) -> Result<KvPoolExport, CudaError> {
    gpu.bind()?;
    let mut handle = drv_sys::CUipcMemHandle {
        reserved: [0; IPC_HANDLE_BYTES],
    };
    // SAFETY: `base` is the start of a live cuMemAlloc allocation.
    let status = unsafe { drv_sys::cuIpcGetMemHandle(&mut handle, base) };
    check(status, "cuIpcGetMemHandle")?;
    Ok(KvPoolExport {
        mem_handle: handle.reserved.iter().map(|&c| c as u8).collect(),
        device: pci_bus_id(gpu.ctx.cu_device())?,
        layout,
        other_ranks: Vec::new(),
    })
}

fn check(status: drv_sys::CUresult, what: &str) -> Result<(), CudaError> {
    if status == drv_sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Driver(format!("{what}: {status:?}")))
    }
}

/// The PCI bus id of a device, e.g. `0000:19:00.0`.
pub(super) fn pci_bus_id(device: drv_sys::CUdevice) -> Result<String, CudaError> {
    let mut buf = [0 as std::ffi::c_char; 32];
    // SAFETY: the buffer holds `len` bytes; the driver NUL-terminates.
    let status =
        unsafe { drv_sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, device) };
    check(status, "cuDeviceGetPCIBusId")?;
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A peer's pool mapped into this process; unmapped on drop.
struct OpenedPool {
    base: u64,
}

impl Drop for OpenedPool {
    fn drop(&mut self) {
        // SAFETY: opened by cuIpcOpenMemHandle, closed once.
        unsafe {
            let _ = drv_sys::cuIpcCloseMemHandle(self.base);
        }
    }
}

/// Writes prompts' KV into peers' pools: the copy kernel and the peers'
/// pools opened so far (one open per handle, kept while the process lives).
pub(super) struct PeerWriter {
    copy: CudaFunction,
    opened: HashMap<Vec<u8>, OpenedPool>,
}

// SAFETY: used only by the engine thread that owns the backend, with the
// backend's context bound.
unsafe impl Send for PeerWriter {}

impl PeerWriter {
    pub fn new(gpu: &Gpu) -> Result<Self, CudaError> {
        gpu.bind()?;
        let opts = CompileOptions {
            arch: Some(gpu.arch),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(COPY_KERNEL, opts)
            .map_err(|e| CudaError::Compile(format!("kv_copy_blocks: {e:?}")))?;
        let module = gpu.ctx.load_module(Ptx::from_src(ptx.to_src()))?;
        Ok(Self {
            copy: module.load_function("kv_copy_blocks")?,
            opened: HashMap::new(),
        })
    }

    /// Maps `pool` (once; later calls reuse the mapping) after checking that
    /// `local`'s blocks can be copied into it. Returns the mapped base.
    pub fn open(
        &mut self,
        gpu: &Gpu,
        local: &KvPoolLayout,
        pool: &KvPoolExport,
    ) -> Result<u64, CudaError> {
        check_ranks(1, pool).map_err(CudaError::Unsupported)?;
        local
            .compatible_with(&pool.layout)
            .map_err(CudaError::Unsupported)?;
        if let Some(p) = self.opened.get(&pool.mem_handle) {
            return Ok(p.base);
        }
        if pool.mem_handle.len() != IPC_HANDLE_BYTES {
            return Err(CudaError::Unsupported(format!(
                "an IPC handle of {} bytes (CUDA's have {IPC_HANDLE_BYTES})",
                pool.mem_handle.len()
            )));
        }
        gpu.bind()?;
        let mut handle = drv_sys::CUipcMemHandle {
            reserved: [0; IPC_HANDLE_BYTES],
        };
        for (d, &s) in handle.reserved.iter_mut().zip(&pool.mem_handle) {
            *d = s as std::ffi::c_char;
        }
        let mut base: drv_sys::CUdeviceptr = 0;
        let flags = drv_sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: `handle` is a handle another process exported; the driver
        // validates it and fails cleanly if it cannot map it here.
        let status = unsafe { drv_sys::cuIpcOpenMemHandle_v2(&mut base, handle, flags) };
        check(
            status,
            &format!(
                "cuIpcOpenMemHandle for the KV pool on GPU {} (from {})",
                pool.device,
                pci_bus_id(gpu.ctx.cu_device()).unwrap_or_default()
            ),
        )?;
        self.opened
            .insert(pool.mem_handle.clone(), OpenedPool { base });
        Ok(base)
    }

    /// Copies the first `num_tokens` positions of `src_blocks` (in the pool
    /// at `local_base`) into `target`'s blocks, every layer, and waits for
    /// the copy to finish.
    pub fn write(
        &mut self,
        gpu: &Gpu,
        local_base: u64,
        local: &KvPoolLayout,
        src_blocks: &[u32],
        num_tokens: usize,
        target: &PeerKvTarget,
    ) -> Result<PeerWrite, CudaError> {
        let blocks =
            check_copy(local, src_blocks, num_tokens, target).map_err(CudaError::Unsupported)?;
        if blocks == 0 {
            return Ok(PeerWrite {
                bytes: 0,
                seconds: 0.0,
            });
        }
        let dst_base = self.open(gpu, local, &target.pool)?;
        gpu.bind()?;
        let src_table = gpu.upload(&src_blocks[..blocks])?;
        let dst_table = gpu.upload(&target.block_ids[..blocks])?;
        let start = gpu.timing_event()?;
        let (src_plane, dst_plane, block_bytes) = (
            local.plane_stride_bytes as u64,
            target.pool.layout.plane_stride_bytes as u64,
            local.block_bytes as u64,
        );
        // check_copy bounded every block id by its pool; both pools span
        // 2 * num_layers planes of their stride; the tables live until the
        // synchronisation below.
        gpu.peer_copy(
            &self.copy,
            &PeerCopy {
                src: Dev::at(local_base),
                dst: Dev::at(dst_base),
                src_blocks: src_table.dev(),
                dst_blocks: dst_table.dev(),
                src_plane,
                dst_plane,
                block_bytes,
                blocks,
                planes: 2 * local.num_layers,
            },
        )?;
        let end = gpu.timing_event()?;
        end.synchronize()?;
        let ms = start.elapsed_ms(&end)?;
        Ok(PeerWrite {
            bytes: local.bytes_for_blocks(blocks),
            seconds: f64::from(ms) / 1e3,
        })
    }
}

/// GB/s of `cuMemcpyPeerAsync` from GPU `src` to GPU `dst` over `bytes`,
/// median of `reps` timed copies after one warm-up: the ceiling the cuda-ipc
/// transport is measured against.
pub fn peer_copy_gbps(src: usize, dst: usize, bytes: usize, reps: usize) -> Result<f64, CudaError> {
    use cudarc::driver::CudaContext;
    super::device::check_libraries()?;
    let src_ctx = CudaContext::new(src)?;
    let dst_ctx = CudaContext::new(dst)?;
    dst_ctx.bind_to_thread()?;
    let dst_buf = alloc(bytes)?;
    src_ctx.bind_to_thread()?;
    let src_buf = alloc(bytes)?;
    if src != dst {
        // SAFETY: both contexts are alive; enabling twice is reported, not fatal.
        let status = unsafe { drv_sys::cuCtxEnablePeerAccess(dst_ctx.cu_ctx(), 0) };
        if status != drv_sys::CUresult::CUDA_SUCCESS
            && status != drv_sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED
        {
            return Err(CudaError::Driver(format!(
                "cuCtxEnablePeerAccess from cuda:{src} to cuda:{dst}: {status:?}"
            )));
        }
    }
    let stream = src_ctx.new_stream()?;
    let timing = Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(reps);
    for i in 0..=reps {
        let start = stream.record_event(timing)?;
        // SAFETY: both buffers hold `bytes` bytes and outlive the copy.
        let status = unsafe {
            drv_sys::cuMemcpyPeerAsync(
                dst_buf.ptr(),
                dst_ctx.cu_ctx(),
                src_buf.ptr(),
                src_ctx.cu_ctx(),
                bytes,
                stream.cu_stream(),
            )
        };
        check(status, "cuMemcpyPeerAsync")?;
        let end = stream.record_event(timing)?;
        let ms = start.elapsed_ms(&end)?;
        if i > 0 {
            times.push(f64::from(ms) / 1e3);
        }
    }
    stream.synchronize()?;
    drop(src_buf);
    dst_ctx.bind_to_thread()?;
    drop(dst_buf);
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(bytes as f64 / median / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(block_size: usize, num_blocks: usize) -> KvPoolLayout {
        let block_bytes = block_size * 3 * 64 * 2;
        KvPoolLayout {
            dtype: PoolDtype::Bf16,
            block_size,
            num_blocks,
            num_layers: 30,
            kv_heads: 3,
            head_dim: 64,
            block_bytes,
            plane_stride_bytes: num_blocks * block_bytes,
        }
    }

    fn target(pool: KvPoolLayout, block_ids: Vec<u32>) -> PeerKvTarget {
        PeerKvTarget {
            pool: KvPoolExport {
                mem_handle: vec![0; IPC_HANDLE_BYTES],
                device: "0000:00:00.0".into(),
                layout: pool,
                other_ranks: Vec::new(),
            },
            block_ids,
        }
    }

    #[test]
    fn pools_of_other_sizes_are_compatible_but_other_geometries_are_named() {
        let mine = layout(16, 100);
        assert_eq!(mine.compatible_with(&layout(16, 5000)), Ok(()));
        let err = mine.compatible_with(&layout(32, 100)).unwrap_err();
        assert!(err.contains("block size differs: 16 here, 32"), "{err}");
        let mut other = layout(16, 100);
        other.num_layers = 32;
        let err = mine.compatible_with(&other).unwrap_err();
        assert!(err.contains("layers differs: 30 here, 32"), "{err}");
        let mut broken = layout(16, 100);
        broken.block_bytes += 2;
        let err = mine.compatible_with(&broken).unwrap_err();
        assert!(err.contains("the receiving pool: block_bytes"), "{err}");
        let mut short = layout(16, 100);
        short.plane_stride_bytes -= 16;
        assert!(mine.compatible_with(&short).is_err());
    }

    #[test]
    fn a_copy_covers_whole_blocks_and_refuses_ids_outside_either_pool() {
        let mine = layout(16, 100);
        // 33 tokens: three blocks, the last one partial.
        assert_eq!(
            check_copy(
                &mine,
                &[7, 8, 9],
                33,
                &target(layout(16, 10), vec![0, 1, 2])
            ),
            Ok(3)
        );
        assert_eq!(mine.bytes_for_blocks(3), 2 * 30 * 3 * 16 * 3 * 64 * 2);
        let err =
            check_copy(&mine, &[7, 8], 33, &target(layout(16, 10), vec![0, 1, 2])).unwrap_err();
        assert!(err.contains("33 tokens need 3 blocks"), "{err}");
        let err = check_copy(
            &mine,
            &[7, 8, 9],
            33,
            &target(layout(16, 10), vec![0, 1, 10]),
        )
        .unwrap_err();
        assert!(err.contains("reserved block 10 is outside"), "{err}");
        let err = check_copy(
            &mine,
            &[7, 8, 100],
            33,
            &target(layout(16, 10), vec![0, 1, 2]),
        )
        .unwrap_err();
        assert!(err.contains("source block 100"), "{err}");
    }

    fn export(handle: u8, device: &str, layout: KvPoolLayout) -> KvPoolExport {
        KvPoolExport {
            mem_handle: vec![handle; IPC_HANDLE_BYTES],
            device: device.into(),
            layout,
            other_ranks: Vec::new(),
        }
    }

    #[test]
    fn a_group_exports_one_handle_per_rank_and_each_rank_gets_its_own_back() {
        let group = KvPoolExport::from_ranks(vec![
            export(1, "0000:19:00.0", layout(16, 100)),
            export(2, "0000:3b:00.0", layout(16, 100)),
            export(3, "0000:4c:00.0", layout(16, 100)),
        ])
        .unwrap();
        assert_eq!(group.ranks(), 3);
        for (r, (handle, device)) in [
            (1, "0000:19:00.0"),
            (2, "0000:3b:00.0"),
            (3, "0000:4c:00.0"),
        ]
        .into_iter()
        .enumerate()
        {
            let one = group.rank(r).unwrap();
            assert_eq!(one.mem_handle, vec![handle; IPC_HANDLE_BYTES]);
            assert_eq!(one.device, device);
            assert_eq!(one.ranks(), 1);
            assert_eq!(one.layout, layout(16, 100));
        }
        assert_eq!(group.rank(3), None);

        let err = KvPoolExport::from_ranks(vec![
            export(1, "a", layout(16, 100)),
            export(2, "b", layout(16, 99)),
        ])
        .unwrap_err();
        assert!(err.contains("rank 1's KV pool"), "{err}");
    }

    #[test]
    fn groups_of_unequal_size_are_refused_with_both_sizes_named() {
        let one = export(1, "a", layout(16, 100));
        let two =
            KvPoolExport::from_ranks(vec![one.clone(), export(2, "b", layout(16, 100))]).unwrap();
        assert_eq!(check_ranks(1, &one), Ok(()));
        assert_eq!(check_ranks(2, &two), Ok(()));
        let err = check_ranks(1, &two).unwrap_err();
        assert!(
            err.contains(
                "split over 2 GPUs (--tensor-parallel-size 2), this prefill worker's over one GPU"
            ),
            "{err}"
        );
        let err = check_ranks(4, &one).unwrap_err();
        assert!(
            err.contains("split over one GPU, this prefill worker's over 4 GPUs"),
            "{err}"
        );
        // One GPU's copy never writes into rank 0 of a group alone.
        let err = check_copy(
            &layout(16, 100),
            &[7],
            3,
            &PeerKvTarget {
                pool: two,
                block_ids: vec![0],
            },
        )
        .unwrap_err();
        assert!(err.contains("groups of equal size"), "{err}");
    }
}
