//! The device side of the CUDA backend: context and stream, the NVRTC-compiled
//! kernels (compiled once per process and architecture), raw device and pinned
//! host buffers, and the cuBLAS GEMM the model's projections run on.
//!
//! Buffers are raw device pointers owned by RAII wrappers rather than
//! `cudarc::CudaSlice`s: the forward pass addresses sub-ranges of a few large
//! allocations (layer `l` of the KV pool, row `t` of a workspace), and the
//! pointers must stay fixed for CUDA graph replay.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::sys as cublas_sys;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{result as drv, sys as drv_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::CudaError;

/// The kernels' CUDA C source, compiled by NVRTC at start.
const KERNEL_SOURCE: &str = include_str!("../../../kernels/llama.cu");

/// Every kernel of `llama.cu`, loaded once per backend.
pub(super) struct Kernels {
    pub fill_uniform_bf16: CudaFunction,
    pub fill_f32: CudaFunction,
    pub embed_gather: CudaFunction,
    pub rms_norm: CudaFunction,
    pub rope_table: CudaFunction,
    pub rope_kv_write: CudaFunction,
    pub silu_mul: CudaFunction,
    pub silu_mul_f32: CudaFunction,
    /// The older decode attention, indexed by head_dim / 32 - 1; compiled
    /// only for the head dims `decode_attention_v2` does not cover.
    pub decode_attention: Vec<Option<CudaFunction>>,
    /// The context-independent decode attention, indexed by
    /// [`decode_v2_index`].
    pub decode_attention_v2: Vec<CudaFunction>,
    pub prefill_attention: CudaFunction,
    pub prefill_attention_tc64: CudaFunction,
    pub prefill_attention_tc128: CudaFunction,
    /// The Hopper (wgmma) prefill attention for head dims 64 and 128, in
    /// that order; compiled only for `sm_90a`.
    pub prefill_attention_wg: Option<[CudaFunction; 2]>,
    /// Fused small-batch projections, indexed by [`gemv_index`] of the
    /// step's token count (1, 2 or 4).
    pub gemv_qkv: Vec<CudaFunction>,
    pub gemv_silu: Vec<CudaFunction>,
    pub gemv_out: Vec<CudaFunction>,
    pub sample_rows: CudaFunction,
    pub kv_gather: CudaFunction,
    pub kv_scatter: CudaFunction,
}

/// Token counts the fused small-batch projections are compiled for
/// (`GEMV_KERNELS(M)` in llama.cu).
pub(super) const GEMV_TOKENS: [usize; 3] = [1, 2, 4];

/// Index into the `gemv_*` kernels for a step of `tokens` tokens, if one fits.
pub(super) fn gemv_index(tokens: usize) -> Option<usize> {
    GEMV_TOKENS.iter().position(|&m| m == tokens)
}

/// Checks that the libraries the backend loads at run time are present, so a
/// machine without them gets an error naming what is missing (cudarc would
/// panic on first use).
pub(super) fn check_libraries() -> Result<(), CudaError> {
    // SAFETY: these only try to dlopen the libraries.
    let present = unsafe {
        [
            ("CUDA driver", "libcuda.so", drv_sys::is_culib_present()),
            (
                "NVRTC",
                "libnvrtc.so",
                cudarc::nvrtc::sys::is_culib_present(),
            ),
            ("cuBLAS", "libcublas.so", cublas_sys::is_culib_present()),
        ]
    };
    for (what, lib, ok) in present {
        if !ok {
            return Err(CudaError::NoLibrary(format!(
                "no {what} found ({lib}): install the NVIDIA driver and CUDA 13 libraries, \
                 or put them on LD_LIBRARY_PATH"
            )));
        }
    }
    Ok(())
}

/// The directory holding `cuda_bf16.h`: `$TANDEM_CUDA_INCLUDE`, else
/// `$CUDA_HOME/include`, `$CUDA_PATH/include`, else `/usr/local/cuda/include`.
pub(super) fn cuda_include_dir() -> String {
    if let Ok(dir) = std::env::var("TANDEM_CUDA_INCLUDE") {
        return dir;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(home) = std::env::var(var) {
            return format!("{home}/include");
        }
    }
    "/usr/local/cuda/include".to_string()
}

/// NVRTC's architecture flag for a compute capability.
fn arch_flag(major: i32, minor: i32) -> Result<&'static str, CudaError> {
    Ok(match (major, minor) {
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 7) => "sm_87",
        (8, 9) => "sm_89",
        // The architecture-specific target: wgmma (the Hopper prefill
        // attention) exists only there.
        (9, 0) => "sm_90a",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        _ => {
            return Err(CudaError::Unsupported(format!(
                "compute capability {major}.{minor}: the kernels need bf16 (8.0 or newer)"
            )))
        }
    })
}

/// `-D` options for the kernels' tunable constants from
/// `$TANDEM_CUDA_DEFINES` (whitespace-separated `NAME=VALUE`, e.g.
/// `GEMV_UNROLL=8`): for measuring variants of the kernels on a GPU machine
/// without rebuilding. Empty when unset.
fn kernel_defines() -> Vec<String> {
    std::env::var("TANDEM_CUDA_DEFINES")
        .map(|v| v.split_whitespace().map(|d| format!("-D{d}")).collect())
        .unwrap_or_default()
}

/// PTX per architecture, compiled once per process.
fn compiled_ptx(arch: &'static str) -> Result<String, CudaError> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(ptx) = cache.get(arch) {
        return Ok(ptx.clone());
    }
    let started = std::time::Instant::now();
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: vec![cuda_include_dir()],
        options: std::iter::once("--std=c++17".to_string())
            .chain(kernel_defines())
            .collect(),
        ..Default::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNEL_SOURCE, opts)
        .map_err(|e| CudaError::Compile(format!("{e:?} (include path {})", cuda_include_dir())))?
        .to_src();
    tracing::info!(
        arch,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "compiled CUDA kernels"
    );
    cache.insert(arch, ptx.clone());
    Ok(ptx)
}

/// A device allocation, freed on drop.
pub(super) struct DeviceBuffer {
    ptr: CUdeviceptr,
    bytes: usize,
}

// SAFETY: a device pointer is an address in the context's memory, usable from
// any thread that binds the context (the backend binds it on every call).
unsafe impl Send for DeviceBuffer {}

impl DeviceBuffer {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by malloc_sync and freed once; the backend
            // synchronises its stream before dropping buffers.
            unsafe {
                let _ = drv::free_sync(self.ptr);
            }
        }
    }
}

/// A TMA tensor map, passed to a kernel by value (`TmaMap` in llama.cu).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(super) struct TmaMap(drv_sys::CUtensorMap);

// SAFETY: a plain 128-byte, 128-aligned struct, which the kernels take as a
// `__grid_constant__` parameter of the same size.
unsafe impl cudarc::driver::DeviceRepr for TmaMap {}

/// Rows a TMA box of the KV pool takes for `block_size`: one page, or 64
/// keys of one; `None` where tiles of 64 keys don't fall on whole boxes or a
/// box isn't a whole number of 8-row swizzle atoms.
pub(super) fn kv_box_rows(block_size: usize) -> Option<u32> {
    let whole = if block_size <= 64 {
        block_size > 0 && 64 % block_size == 0
    } else {
        block_size.is_multiple_of(64)
    };
    let rows = block_size.min(64);
    (whole && rows.is_multiple_of(8)).then_some(rows as u32)
}

/// The KV pool at `base` as a TMA tensor map: `rows` rows of `row_elems`
/// bf16, read in boxes of 64 values x `box_rows` rows with the 128-byte
/// swizzle that the wgmma prefill kernel's shared-memory tiles use; rows past
/// the end read as zeros.
pub(super) fn kv_tensor_map(
    base: u64,
    rows: usize,
    row_elems: usize,
    box_rows: u32,
) -> Result<TmaMap, CudaError> {
    use drv_sys::*;
    let dims: [cuuint64_t; 2] = [row_elems as u64, rows as u64];
    let strides: [cuuint64_t; 1] = [row_elems as u64 * 2];
    let boxes: [cuuint32_t; 2] = [64, box_rows];
    let steps: [cuuint32_t; 2] = [1, 1];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: every pointer is to a local array of the rank's length, and the
    // map is written in full on success.
    let rc = unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    rc.result().map_err(CudaError::from)?;
    // SAFETY: initialised by the successful call above.
    Ok(TmaMap(unsafe { map.assume_init() }))
}

/// Page-locked host memory: device-to-host copies into it run at full PCIe
/// speed and can be asynchronous.
pub(super) struct PinnedBuffer {
    ptr: *mut u8,
    bytes: usize,
}

// SAFETY: plain host memory owned by this value.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    pub fn as_slice<T: bytemuck::Pod>(&self, len: usize) -> &[T] {
        assert!(len * std::mem::size_of::<T>() <= self.bytes);
        // SAFETY: in bounds (checked), page-aligned allocation, Pod element type.
        unsafe { std::slice::from_raw_parts(self.ptr as *const T, len) }
    }

    pub fn as_mut_slice<T: bytemuck::Pod>(&mut self, len: usize) -> &mut [T] {
        assert!(len * std::mem::size_of::<T>() <= self.bytes);
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host, freed once.
        unsafe {
            let _ = drv::free_host(self.ptr as *mut c_void);
        }
    }
}

/// Element type of a GEMM operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dtype {
    Bf16,
    F32,
}

impl Dtype {
    fn cuda(self) -> cublas_sys::cudaDataType {
        match self {
            Dtype::Bf16 => cublas_sys::cudaDataType::CUDA_R_16BF,
            Dtype::F32 => cublas_sys::cudaDataType::CUDA_R_32F,
        }
    }
}

/// One GPU: context, the stream everything runs on, cuBLAS and the kernels.
/// Fields drop in order: the workspace and handles before the context.
pub(super) struct Gpu {
    /// cuBLAS workspace, set explicitly so GEMMs can be captured in graphs.
    _blas_workspace: DeviceBuffer,
    pub blas: CudaBlas,
    pub kernels: Kernels,
    pub name: String,
    pub arch: &'static str,
    pub num_sms: u32,
    /// Shared memory an SM holds for all its resident blocks (bytes).
    pub smem_per_sm: u32,
    pub stream: Arc<CudaStream>,
    pub ctx: Arc<CudaContext>,
}

// SAFETY: the backend is used from one thread at a time (the engine thread);
// every entry point binds the context to the calling thread first.
unsafe impl Send for Gpu {}

/// Head dims and GQA group bounds the `decode_attention_v2_{hd}_{g}` kernels
/// are compiled for (llama.cu: 16-byte loads of 8 elements, HD / 8 lanes per
/// position, which must divide a warp).
pub(super) const DECODE_V2_HEAD_DIMS: [usize; 3] = [32, 64, 128];
pub(super) const DECODE_V2_GROUPS: [usize; 4] = [1, 2, 4, 8];

/// Index into [`Kernels::decode_attention_v2`] of the kernel for `head_dim`
/// and a GQA group of `group` query heads (the smallest compiled bound that
/// holds it), or `None` where none is compiled.
pub(super) fn decode_v2_index(head_dim: usize, group: usize) -> Option<usize> {
    let h = DECODE_V2_HEAD_DIMS.iter().position(|&d| d == head_dim)?;
    let g = DECODE_V2_GROUPS.iter().position(|&g| g >= group)?;
    Some(h * DECODE_V2_GROUPS.len() + g)
}

/// Largest dynamic shared memory the attention kernels may ask for (Hopper
/// and Ampere A100 give a block up to 227 and 163 KiB).
pub(super) const MAX_ATTENTION_SMEM: u32 = 160 * 1024;

/// Checks that `size` GPUs from `cuda:first` on can be opened: the libraries
/// are present, the driver answers, and it sees that many devices.
pub(crate) fn check_gpus(first: usize, size: usize) -> Result<(), CudaError> {
    check_libraries()?;
    let visible = CudaContext::device_count()
        .map_err(|e| CudaError::Driver(e.to_string()))?
        .max(0) as usize;
    if first + size <= visible {
        return Ok(());
    }
    Err(CudaError::NoDevice(if size > 1 {
        format!(
            "--tensor-parallel-size {size} from cuda:{first} needs GPUs {first}..={}, but the \
             driver sees {visible} GPU(s) (check CUDA_VISIBLE_DEVICES)",
            first + size - 1
        )
    } else {
        format!("cuda:{first} asked for, but the driver sees {visible} device(s)")
    }))
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        check_gpus(ordinal, 1)?;
        let ctx = CudaContext::new(ordinal)?;
        // The backend synchronises its single stream itself.
        // SAFETY: no CudaSlice is shared between streams.
        unsafe { ctx.disable_event_tracking() };
        // Graph capture needs a stream other than the legacy default stream.
        let stream = ctx.new_stream()?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_flag(major, minor)?;
        let name = ctx.name()?;
        let num_sms = ctx
            .attribute(drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        let smem_per_sm = ctx.attribute(
            drv_sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR,
        )? as u32;
        let module = ctx.load_module(Ptx::from_src(compiled_ptx(arch)?))?;
        let f = |name: &str| module.load_function(name);
        let kernels = Kernels {
            fill_uniform_bf16: f("fill_uniform_bf16")?,
            fill_f32: f("fill_f32")?,
            embed_gather: f("embed_gather")?,
            rms_norm: f("rms_norm")?,
            rope_table: f("rope_table")?,
            rope_kv_write: f("rope_kv_write")?,
            silu_mul: f("silu_mul")?,
            silu_mul_f32: f("silu_mul_f32")?,
            decode_attention: (1..=8)
                .map(|pl| {
                    let covered = DECODE_V2_HEAD_DIMS.contains(&(32 * pl));
                    (!covered)
                        .then(|| f(&format!("decode_attention_{pl}")))
                        .transpose()
                })
                .collect::<Result<_, _>>()?,
            decode_attention_v2: DECODE_V2_HEAD_DIMS
                .iter()
                .flat_map(|hd| {
                    DECODE_V2_GROUPS
                        .iter()
                        .map(move |g| format!("decode_attention_v2_{hd}_{g}"))
                })
                .map(|name| f(&name))
                .collect::<Result<_, _>>()?,
            prefill_attention: f("prefill_attention")?,
            prefill_attention_tc64: f("prefill_attention_tc64")?,
            prefill_attention_tc128: f("prefill_attention_tc128")?,
            prefill_attention_wg: if arch == "sm_90a" {
                Some([f("prefill_attention_wg64")?, f("prefill_attention_wg128")?])
            } else {
                None
            },
            gemv_qkv: GEMV_TOKENS
                .iter()
                .map(|m| f(&format!("gemv_qkv_{m}")))
                .collect::<Result<_, _>>()?,
            gemv_silu: GEMV_TOKENS
                .iter()
                .map(|m| f(&format!("gemv_silu_{m}")))
                .collect::<Result<_, _>>()?,
            gemv_out: GEMV_TOKENS
                .iter()
                .map(|m| f(&format!("gemv_out_{m}")))
                .collect::<Result<_, _>>()?,
            sample_rows: f("sample_rows")?,
            kv_gather: f("kv_gather")?,
            kv_scatter: f("kv_scatter")?,
        };
        for k in kernels
            .decode_attention
            .iter()
            .flatten()
            .chain(&kernels.decode_attention_v2)
            .chain([
                &kernels.prefill_attention,
                &kernels.prefill_attention_tc64,
                &kernels.prefill_attention_tc128,
            ])
            .chain(kernels.prefill_attention_wg.iter().flatten())
            .chain(&kernels.gemv_qkv)
            .chain(&kernels.gemv_silu)
            .chain(&kernels.gemv_out)
        {
            k.set_attribute(
                drv_sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                MAX_ATTENTION_SMEM as i32,
            )?;
        }
        let blas = CudaBlas::new(stream.clone())?;
        let workspace = alloc(32 << 20)?;
        // SAFETY: the workspace outlives the handle (both live in `Gpu`).
        unsafe {
            let status = cublas_sys::cublasSetWorkspace_v2(
                *blas.handle(),
                workspace.ptr() as *mut c_void,
                workspace.bytes(),
            );
            if status != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(CudaError::Blas(format!("cublasSetWorkspace: {status:?}")));
            }
        }
        Ok(Self {
            _blas_workspace: workspace,
            blas,
            kernels,
            name,
            arch,
            num_sms,
            smem_per_sm,
            stream,
            ctx,
        })
    }

    pub fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread()?;
        Ok(())
    }

    pub fn cu_stream(&self) -> drv_sys::CUstream {
        self.stream.cu_stream()
    }

    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// An event recorded on the stream now, with timing (for `elapsed_ms`
    /// between two of them).
    pub fn timing_event(&self) -> Result<cudarc::driver::CudaEvent, CudaError> {
        Ok(self
            .stream
            .record_event(Some(drv_sys::CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// (free, total) bytes of device memory.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        Ok(self.ctx.mem_get_info()?)
    }

    /// `count` elements of `T` copied to the device (synchronously).
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer, CudaError> {
        let buf = alloc(std::mem::size_of_val(data).max(1))?;
        self.copy_to(&buf, 0, data)?;
        self.synchronize()?;
        Ok(buf)
    }

    /// Asynchronous host-to-device copy of `data` to `buf` at byte `offset`.
    /// The host memory must stay unchanged until the stream passes the copy
    /// (pinned memory), or the call is followed by a synchronisation.
    pub fn copy_to<T: bytemuck::Pod>(
        &self,
        buf: &DeviceBuffer,
        offset: usize,
        data: &[T],
    ) -> Result<(), CudaError> {
        assert!(offset + std::mem::size_of_val(data) <= buf.bytes);
        if data.is_empty() {
            return Ok(());
        }
        // SAFETY: destination range checked above.
        unsafe { drv::memcpy_htod_async(buf.ptr + offset as u64, data, self.cu_stream())? };
        Ok(())
    }

    /// Asynchronous device-to-host copy from device address `src`.
    pub fn copy_from<T: bytemuck::Pod>(&self, src: u64, out: &mut [T]) -> Result<(), CudaError> {
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: callers pass addresses inside live buffers of at least `out` bytes.
        unsafe { drv::memcpy_dtoh_async(out, src, self.cu_stream())? };
        Ok(())
    }

    pub fn copy_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: callers pass ranges inside live buffers.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.cu_stream())? };
        Ok(())
    }

    pub fn zero(&self, buf: &DeviceBuffer) -> Result<(), CudaError> {
        // SAFETY: the whole buffer.
        unsafe { drv::memset_d8_async(buf.ptr, 0, buf.bytes, self.cu_stream())? };
        Ok(())
    }

    /// Row-major `C[m, n] = alpha * A[m, k] · B[n, k]^T + beta * C`: activations
    /// times a weight matrix in HF `[out, in]` layout, accumulated in f32.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: u64,
        a_type: Dtype,
        b: u64,
        c: u64,
        c_type: Dtype,
        beta: f32,
    ) -> Result<(), CudaError> {
        if m == 0 {
            return Ok(());
        }
        let alpha = 1.0f32;
        // Column-major view: C^T[n, m] = B[n, k] · A^T, i.e. op(B) = T on the
        // k x n column-major buffer, op(A) = N.
        // SAFETY: pointers address live buffers of the stated shapes.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                Dtype::Bf16.cuda(),
                k as i32,
                a as *const c_void,
                a_type.cuda(),
                k as i32,
                &beta as *const f32 as *const c_void,
                c as *mut c_void,
                c_type.cuda(),
                n as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// Launches `func` over `cfg` with `args` (a pointer to each argument's
    /// value, in the kernel's order). With `early`, as a programmatic
    /// dependent launch: the kernel may start while the previous kernel of
    /// the stream still runs, and must wait for it (`pdl_wait` in llama.cu)
    /// before reading anything it wrote.
    ///
    /// # Safety
    /// `args` must match the kernel's parameters in number, order and size,
    /// point to live values, and every pointer among them address a buffer
    /// of the size the kernel indexes; with `early`, the kernel must call
    /// `pdl_wait` before touching data of earlier work.
    pub unsafe fn launch_ex(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        early: bool,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: a plain C struct; zero is a valid bit pattern.
        let mut attr: drv_sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
        attr.id =
            drv_sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
        attr.value.programmaticStreamSerializationAllowed = 1;
        let config = drv_sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.cu_stream(),
            attrs: if early {
                &mut attr
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(early),
        };
        // SAFETY: the caller's contract; `config` and `attr` outlive the call.
        unsafe {
            drv_sys::cuLaunchKernelEx(
                &config,
                func.cu_function(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
            .result()?;
        }
        Ok(())
    }

    /// Fills `n` bf16 at `ptr` with uniform values in `[-scale, scale]`.
    pub fn fill_uniform(&self, ptr: u64, n: usize, seed: u64, scale: f32) -> Result<(), CudaError> {
        let n = n as u64;
        let mut b = self.stream.launch_builder(&self.kernels.fill_uniform_bf16);
        b.arg(&ptr).arg(&n).arg(&seed).arg(&scale);
        // SAFETY: the kernel writes n bf16 at ptr, which the caller allocated.
        unsafe { b.launch(grid_stride(self.num_sms))? };
        Ok(())
    }

    pub fn fill_f32(&self, ptr: u64, n: usize, value: f32) -> Result<(), CudaError> {
        let n = n as u64;
        let mut b = self.stream.launch_builder(&self.kernels.fill_f32);
        b.arg(&ptr).arg(&n).arg(&value);
        // SAFETY: as above, n f32.
        unsafe { b.launch(grid_stride(self.num_sms))? };
        Ok(())
    }
}

/// A grid-stride launch covering the whole device.
pub(super) fn grid_stride(num_sms: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (num_sms * 8, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Allocates `bytes` of device memory (contents undefined).
pub(super) fn alloc(bytes: usize) -> Result<DeviceBuffer, CudaError> {
    // SAFETY: plain allocation of at least one byte.
    let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }
        .map_err(|e| CudaError::OutOfMemory(format!("allocating {} MiB: {e}", bytes >> 20)))?;
    Ok(DeviceBuffer { ptr, bytes })
}

/// Allocates `bytes` of page-locked host memory.
pub(super) fn alloc_pinned(bytes: usize) -> Result<PinnedBuffer, CudaError> {
    // SAFETY: plain allocation.
    let ptr = unsafe { drv::malloc_host(bytes.max(1), 0) }?;
    Ok(PinnedBuffer {
        ptr: ptr as *mut u8,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernels compile for Hopper and Ampere wherever NVRTC is installed
    /// (compiling needs no GPU). `make test` installs NVRTC and the CUDA
    /// headers from PyPI and sets `TANDEM_REQUIRE_NVRTC`, so there a missing
    /// library fails the test; elsewhere it is skipped with a message.
    #[test]
    fn kernels_compile_with_nvrtc() {
        // SAFETY: only tries to dlopen the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            assert!(
                std::env::var_os("TANDEM_REQUIRE_NVRTC").is_none(),
                "TANDEM_REQUIRE_NVRTC is set but no libnvrtc.so.13 is on LD_LIBRARY_PATH"
            );
            eprintln!("skipping: no NVRTC library (libnvrtc.so) on this machine");
            return;
        }
        for arch in ["sm_90a", "sm_90", "sm_80"] {
            let ptx = compiled_ptx(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
            // wgmma exists only on the architecture-specific Hopper target.
            for name in ["prefill_attention_wg64", "prefill_attention_wg128"] {
                assert_eq!(ptx.contains(name), arch == "sm_90a", "{arch}: {name}");
            }
            for name in [
                "decode_attention_3",
                "decode_attention_8",
                "decode_attention_v2_64_4",
                "decode_attention_v2_128_8",
                "prefill_attention",
                "rope_table",
                "rope_kv_write",
                "silu_mul",
                "silu_mul_f32",
                "gemv_qkv_4",
                "gemv_out_1",
                "sample_rows",
            ] {
                assert!(ptx.contains(name), "{arch} PTX lacks {name}");
            }
        }
        assemble_with_ptxas();
    }

    /// NVRTC passes inline PTX (wgmma, cp.async, ldmatrix) through unchecked;
    /// ptxas, which the driver runs at load time, is what rejects a mistake.
    /// With `$TANDEM_PTXAS` (set by `make test`) the sm_90a PTX is assembled
    /// here too, so such a mistake fails CI instead of a GPU machine.
    fn assemble_with_ptxas() {
        let Some(ptxas) = std::env::var_os("TANDEM_PTXAS") else {
            eprintln!("skipping ptxas: TANDEM_PTXAS is not set");
            return;
        };
        let dir = std::env::temp_dir().join(format!("tandem-ptxas-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ptx_path = dir.join("llama.ptx");
        std::fs::write(&ptx_path, compiled_ptx("sm_90a").unwrap()).unwrap();
        let out = std::process::Command::new(&ptxas)
            .args(["-arch=sm_90a", "-v", "-o"])
            .arg(dir.join("llama.cubin"))
            .arg(&ptx_path)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.to_string_lossy()));
        let log = String::from_utf8_lossy(&out.stderr);
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            out.status.success(),
            "ptxas rejected the sm_90a PTX:\n{log}"
        );
        assert!(log.contains("prefill_attention_wg128"), "{log}");
    }
}
