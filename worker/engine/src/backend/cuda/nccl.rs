//! NCCL communicators of one tensor-parallel group inside one process: one
//! communicator per GPU, made together by `ncclCommInitAll`, each used by the
//! thread that drives its GPU.
//!
//! cudarc loads `libnccl` at run time (`dynamic-loading`), so this builds
//! without NCCL; a missing library is a clear error naming the file names
//! looked for. NVLink multicast (NVLS) stays off: a program using it can put
//! a shared host's GPUs out of service, and an all-reduce of a decode step's
//! few kilobytes gains nothing from it.

use std::ffi::c_void;

use cudarc::driver::sys as drv_sys;
use cudarc::nccl::{result, sys};

use super::CudaError;

/// The environment switch NCCL reads at communicator creation to use (or
/// not) NVLink SHARP / multicast.
const NVLS_SWITCH: &str = "NCCL_NVLS_ENABLE";

fn nccl_error(what: &str, e: result::NcclError) -> CudaError {
    CudaError::Nccl(format!("{what}: {:?}", e.0))
}

/// Fails with the file names cudarc tries when `libnccl` cannot be loaded.
pub(super) fn check_library() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { sys::is_culib_present() } {
        return Ok(());
    }
    let names = cudarc::get_lib_name_candidates("nccl");
    Err(CudaError::NoLibrary(format!(
        "tensor parallelism needs NCCL, but no NCCL library was found (looked for {} on the \
         library path); PyTorch's pip package nvidia-nccl-cu13 ships it as \
         nvidia/nccl/lib/libnccl.so.2: link it as libnccl.so in a folder on LD_LIBRARY_PATH",
        names.join(", ")
    )))
}

/// The communicators of one group, rank `r` on `ordinals[r]`; destroyed on
/// drop (after every user of a [`RankComm`] is gone).
pub(super) struct NcclGroup {
    comms: Vec<sys::ncclComm_t>,
}

// SAFETY: the raw communicators are only used through `RankComm`s, each by
// one thread at a time, and destroyed once, on drop.
unsafe impl Send for NcclGroup {}

impl NcclGroup {
    /// Creates one communicator per device of `ordinals` (CUDA runtime
    /// ordinals, which match the driver's).
    pub fn new(ordinals: &[usize]) -> Result<Self, CudaError> {
        check_library()?;
        // NCCL reads this when a communicator is created; Tandem never wants
        // NVLink multicast (see the module's documentation).
        std::env::set_var(NVLS_SWITCH, "0");
        let devs: Vec<i32> = ordinals.iter().map(|&o| o as i32).collect();
        let mut comms = vec![std::ptr::null_mut(); devs.len()];
        // SAFETY: `comms` has room for one communicator per device listed.
        unsafe { result::comm_init_all(comms.as_mut_ptr(), devs.len() as i32, devs.as_ptr()) }
            .map_err(|e| nccl_error("ncclCommInitAll", e))?;
        let version = result::get_nccl_version().unwrap_or(0);
        tracing::info!(
            ranks = devs.len(),
            nccl_version = version,
            "NCCL group ready"
        );
        Ok(Self { comms })
    }

    /// The handle rank `rank` uses.
    pub fn rank(&self, rank: usize) -> RankComm {
        RankComm {
            rank,
            comm: self.comms[rank],
        }
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        for &c in &self.comms {
            // SAFETY: each communicator was created by comm_init_all and is
            // destroyed once; its users are gone.
            if let Err(e) = unsafe { result::comm_destroy(c) } {
                tracing::warn!(error = ?e.0, "destroying an NCCL communicator failed");
            }
        }
    }
}

/// One rank's communicator (not owning it: [`NcclGroup`] does).
#[derive(Debug, Clone, Copy)]
pub(super) struct RankComm {
    pub rank: usize,
    comm: sys::ncclComm_t,
}

// SAFETY: a rank's communicator is used by the one thread that drives its GPU.
unsafe impl Send for RankComm {}

impl RankComm {
    /// Enqueues on `stream` an in-place sum all-reduce of `count` f32 values
    /// at device address `ptr` (capturable into a CUDA graph).
    pub fn all_reduce_sum_f32(
        &self,
        ptr: u64,
        count: usize,
        stream: drv_sys::CUstream,
    ) -> Result<(), CudaError> {
        // SAFETY: `ptr` addresses `count` f32 values on this rank's device,
        // live until the stream has run the reduction.
        unsafe {
            result::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream as sys::cudaStream_t,
            )
        }
        .map(|_| ())
        .map_err(|e| nccl_error("ncclAllReduce", e))
    }
}
