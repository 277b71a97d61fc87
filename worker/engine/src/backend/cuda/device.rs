//! The device side of the CUDA backend: context and stream, the kernels
//! loaded from the NVRTC-compiled program ([`super::kernels`]), typed device
//! addresses, raw device and pinned host buffers, the raw kernel launches
//! (typed per kernel in [`super::launch`]) and the cuBLAS GEMM the model's
//! projections run on.
//!
//! Buffers are raw device pointers owned by RAII wrappers rather than
//! `cudarc::CudaSlice`s: the forward pass addresses sub-ranges of a few large
//! allocations (layer `l` of the KV pool, row `t` of a workspace), and the
//! pointers must stay fixed for CUDA graph replay.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::cublas::sys as cublas_sys;
use cudarc::cublas::CudaBlas;
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{result as drv, sys as drv_sys};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

pub(super) use half::bf16;

use super::kernels::{compiled_ptx, Kernels};
use super::tuning::{CudaTuning, KernelTuning};
use super::CudaError;

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

/// The device address of elements of `T` (`bf16`, `f32`, `i32`, `[f32; 2]`
/// for a `float2`): what a kernel parameter `T*` receives, typed so that a
/// launch cannot be handed the wrong buffer's kind. It carries no length and
/// no ownership: the launch wrappers trust that it addresses live memory of
/// the extent the kernel indexes, which holds for every `Dev` made from this
/// module's buffers with the offsets the forward pass computes.
#[repr(transparent)]
pub(super) struct Dev<T> {
    addr: u64,
    elem: PhantomData<fn() -> T>,
}

impl<T> Clone for Dev<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Dev<T> {}

impl<T> Dev<T> {
    /// The null pointer (an absent optional argument: no bias, no gather).
    pub const NULL: Self = Self::at(0);

    /// Elements of `T` at device address `addr`.
    pub const fn at(addr: u64) -> Self {
        Self {
            addr,
            elem: PhantomData,
        }
    }

    pub fn addr(self) -> u64 {
        self.addr
    }

    /// `elems` elements further on.
    pub fn offset(self, elems: usize) -> Self {
        Self::at(self.addr + (elems * std::mem::size_of::<T>()) as u64)
    }

    /// `opt`'s address, or null.
    pub fn or_null(opt: Option<Self>) -> Self {
        opt.unwrap_or(Self::NULL)
    }
}

/// A device allocation of elements of `T` (`u8`: untyped bytes), freed on
/// drop.
pub(super) struct DeviceBuffer<T = u8> {
    ptr: CUdeviceptr,
    bytes: usize,
    elem: PhantomData<fn() -> T>,
}

// SAFETY: a device pointer is an address in the context's memory, usable from
// any thread that binds the context (the backend binds it on every call).
unsafe impl<T> Send for DeviceBuffer<T> {}

impl<T> DeviceBuffer<T> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The buffer's first element, as a kernel argument.
    pub fn dev(&self) -> Dev<T> {
        Dev::at(self.ptr)
    }

    /// The same allocation holding elements of `U` (e.g. bf16 uploaded as
    /// their `u16` bits).
    pub fn cast<U>(self) -> DeviceBuffer<U> {
        let this = std::mem::ManuallyDrop::new(self);
        DeviceBuffer {
            ptr: this.ptr,
            bytes: this.bytes,
            elem: PhantomData,
        }
    }
}

impl<T> Drop for DeviceBuffer<T> {
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

/// A TMA tensor map, passed to a kernel by value (`TmaMap` in
/// prefill_attention_wg.cu).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(super) struct TmaMap(drv_sys::CUtensorMap);

/// Rows a TMA box of the KV pool takes for `block_size`: one page, or
/// `tile_keys` keys of one (a tile of the wgmma prefill attention, `WG_K`);
/// `None` where tiles don't fall on whole boxes or a box isn't a whole number
/// of 8-row swizzle atoms.
pub(super) fn kv_box_rows(block_size: usize, tile_keys: usize) -> Option<u32> {
    let whole = if block_size <= tile_keys {
        block_size > 0 && tile_keys.is_multiple_of(block_size)
    } else {
        block_size.is_multiple_of(tile_keys)
    };
    let rows = block_size.min(tile_keys);
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

/// A GEMM operand or result: a row-major matrix at a device address, of
/// either element type.
#[derive(Debug, Clone, Copy)]
pub(super) struct Matrix {
    pub addr: u64,
    pub dtype: Dtype,
}

impl From<Dev<bf16>> for Matrix {
    fn from(d: Dev<bf16>) -> Self {
        Self {
            addr: d.addr(),
            dtype: Dtype::Bf16,
        }
    }
}

impl From<Dev<f32>> for Matrix {
    fn from(d: Dev<f32>) -> Self {
        Self {
            addr: d.addr(),
            dtype: Dtype::F32,
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
    /// The constants the kernels were compiled with.
    pub tuning: KernelTuning,
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
    /// Opens `cuda:ordinal` and loads the kernels, compiled with `tuning`'s
    /// constants and include path.
    pub fn open(ordinal: usize, tuning: &CudaTuning) -> Result<Self, CudaError> {
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
        let module = ctx.load_module(Ptx::from_src(compiled_ptx(arch, tuning)?))?;
        let kernels = Kernels::load(&module, arch)?;
        for k in kernels.large_smem() {
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
            tuning: tuning.kernels.clone(),
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

    /// `data` copied to the device (synchronously).
    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<DeviceBuffer<T>, CudaError> {
        let buf = alloc(std::mem::size_of_val(data).max(1))?.cast();
        self.copy_to(&buf, 0, data)?;
        self.synchronize()?;
        Ok(buf)
    }

    /// Asynchronous host-to-device copy of `data` to `buf` at byte `offset`.
    /// The host memory must stay unchanged until the stream passes the copy
    /// (pinned memory), or the call is followed by a synchronisation.
    pub fn copy_to<T: bytemuck::Pod, U>(
        &self,
        buf: &DeviceBuffer<U>,
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

    /// Asynchronous device-to-host copy of `out.len()` elements at `src`.
    pub fn copy_from<T: bytemuck::Pod>(&self, src: Dev<T>, out: &mut [T]) -> Result<(), CudaError> {
        if out.is_empty() {
            return Ok(());
        }
        // SAFETY: callers pass addresses inside live buffers of at least `out` bytes.
        unsafe { drv::memcpy_dtoh_async(out, src.addr(), self.cu_stream())? };
        Ok(())
    }

    pub fn copy_device(&self, dst: u64, src: u64, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: callers pass ranges inside live buffers.
        unsafe { drv::memcpy_dtod_async(dst, src, bytes, self.cu_stream())? };
        Ok(())
    }

    pub fn zero<T>(&self, buf: &DeviceBuffer<T>) -> Result<(), CudaError> {
        // SAFETY: the whole buffer.
        unsafe { drv::memset_d8_async(buf.ptr, 0, buf.bytes, self.cu_stream())? };
        Ok(())
    }

    /// Row-major `C[m, n] = A[m, k] · B[n, k]^T + beta * C`: activations
    /// times a weight matrix `b` in HF `[out, in]` layout, accumulated in f32.
    pub fn gemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Matrix,
        b: Dev<bf16>,
        c: Matrix,
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
                b.addr() as *const c_void,
                Dtype::Bf16.cuda(),
                k as i32,
                a.addr as *const c_void,
                a.dtype.cuda(),
                k as i32,
                &beta as *const f32 as *const c_void,
                c.addr as *mut c_void,
                c.dtype.cuda(),
                n as i32,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )?;
        }
        Ok(())
    }

    /// Launches `func` over `cfg` with `args` (a pointer to each argument's
    /// value, in the kernel's order), as cudarc's launch builder does
    /// (`cuLaunchKernel`).
    ///
    /// # Safety
    /// As for [`Gpu::launch_ex`].
    pub unsafe fn launch(
        &self,
        func: &CudaFunction,
        cfg: LaunchConfig,
        args: &mut [*mut c_void],
    ) -> Result<(), CudaError> {
        self.ctx.bind_to_thread()?;
        // SAFETY: the caller's contract.
        unsafe {
            drv::launch_kernel(
                func.cu_function(),
                cfg.grid_dim,
                cfg.block_dim,
                cfg.shared_mem_bytes,
                self.cu_stream(),
                args,
            )?;
        }
        Ok(())
    }

    /// Launches `func` over `cfg` with `args` like [`Gpu::launch`], through
    /// `cuLaunchKernelEx`. With `early`, as a programmatic dependent launch:
    /// the kernel may start while the previous kernel of the stream still
    /// runs, and must wait for it (`pdl_wait` in common.cuh) before reading
    /// anything it wrote.
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
}

/// Allocates `bytes` of device memory (contents undefined).
pub(super) fn alloc(bytes: usize) -> Result<DeviceBuffer, CudaError> {
    // SAFETY: plain allocation of at least one byte.
    let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }
        .map_err(|e| CudaError::OutOfMemory(format!("allocating {} MiB: {e}", bytes >> 20)))?;
    Ok(DeviceBuffer {
        ptr,
        bytes,
        elem: PhantomData,
    })
}

/// Allocates `len` elements of `T` (contents undefined).
pub(super) fn alloc_array<T>(len: usize) -> Result<DeviceBuffer<T>, CudaError> {
    Ok(alloc(len * std::mem::size_of::<T>())?.cast())
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
