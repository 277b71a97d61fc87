//! cuBLASLt matrix products with an algorithm chosen by timing.
//!
//! `cublasGemmEx` takes the library's first heuristic pick for a shape. For
//! the large prefill GEMMs the heuristic's other candidates are sometimes
//! faster; [`Lt::plan`] lists them for one shape (the same product as
//! [`super::device::Gpu::gemm`]: `C[m, n] = A[m, k] · B[n, k]^T + beta · C`,
//! row-major) and [`Lt::run`] runs one.

use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use super::device::{alloc, DeviceBuffer, Dtype};
use super::CudaError;

/// Workspace the algorithms may use (the same as cuBLAS gets).
const WORKSPACE_BYTES: usize = 32 << 20;

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        CudaError::Blas(format!("cuBLASLt: {e:?}"))
    }
}

/// A cuBLASLt handle and its workspace.
pub(super) struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: DeviceBuffer,
}

// SAFETY: used by the backend's thread with the context bound, as `Gpu`.
unsafe impl Send for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

/// The descriptors of one product shape and its candidate algorithms, best
/// guess first.
pub(super) struct LtPlan {
    desc: sys::cublasLtMatmulDesc_t,
    layouts: [sys::cublasLtMatrixLayout_t; 3],
    pub algos: Vec<sys::cublasLtMatmulHeuristicResult_t>,
}

impl Drop for LtPlan {
    fn drop(&mut self) {
        // SAFETY: created in `Lt::plan`, destroyed once.
        unsafe {
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

fn data_type(d: Dtype) -> sys::cudaDataType {
    match d {
        Dtype::Bf16 => sys::cudaDataType::CUDA_R_16BF,
        Dtype::F32 => sys::cudaDataType::CUDA_R_32F,
    }
}

impl Lt {
    pub fn new() -> Result<Self, CudaError> {
        Ok(Self {
            handle: lt::create_handle()?,
            workspace: alloc(WORKSPACE_BYTES)?,
        })
    }

    /// Up to `count` candidate algorithms for `C[m, n] (c_type) = A[m, k]
    /// (a_type) · B[n, k]^T (bf16)`, f32 accumulation.
    pub fn plan(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a_type: Dtype,
        c_type: Dtype,
        count: usize,
    ) -> Result<LtPlan, CudaError> {
        // Column-major view, as in `Gpu::gemm`: C^T[n, m] = op(B) · A^T with
        // B stored as the k x n column-major matrix (transposed), A^T as k x m.
        let desc = lt::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType::CUDA_R_32F,
        )?;
        let mut plan = LtPlan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algos: Vec::new(),
        };
        // The attribute is a cublasOperation_t, an int32.
        let transpose = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
        // SAFETY: the descriptor is live; the value is the attribute's type.
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                &transpose as *const _ as *const c_void,
                std::mem::size_of_val(&transpose),
            )?;
        }
        plan.layouts[0] =
            lt::create_matrix_layout(data_type(Dtype::Bf16), k as u64, n as u64, k as i64)?;
        plan.layouts[1] =
            lt::create_matrix_layout(data_type(a_type), k as u64, m as u64, k as i64)?;
        plan.layouts[2] =
            lt::create_matrix_layout(data_type(c_type), n as u64, m as u64, n as i64)?;
        let pref = lt::create_matmul_pref()?;
        let workspace = WORKSPACE_BYTES as u64;
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = Vec::with_capacity(count);
        let mut returned = 0i32;
        // SAFETY: live descriptors; `results` has room for `count` results,
        // of which the call fills `returned`.
        let status = unsafe {
            lt::set_matmul_pref_attribute(
                pref,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &workspace as *const u64 as *const c_void,
                std::mem::size_of::<u64>(),
            )
            .and_then(|()| {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    self.handle,
                    desc,
                    plan.layouts[0],
                    plan.layouts[1],
                    plan.layouts[2],
                    plan.layouts[2],
                    pref,
                    count as i32,
                    results.as_mut_ptr(),
                    &mut returned,
                )
                .result()
            })
        };
        // SAFETY: created above.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        status?;
        // SAFETY: the call initialised the first `returned` entries.
        unsafe { results.set_len(returned.max(0) as usize) };
        plan.algos = results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .collect();
        Ok(plan)
    }

    /// Runs `plan` with its algorithm `algo` on `stream`.
    ///
    /// # Safety
    /// `a`, `b` and `c` must address buffers of the plan's shapes and types.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        plan: &LtPlan,
        algo: usize,
        a: u64,
        b: u64,
        c: u64,
        beta: f32,
        stream: sys::cudaStream_t,
    ) -> Result<(), CudaError> {
        let alpha = 1.0f32;
        // SAFETY: the caller's contract; descriptors and workspace are live.
        unsafe {
            lt::matmul(
                self.handle,
                plan.desc,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                b as *const c_void,
                plan.layouts[0],
                a as *const c_void,
                plan.layouts[1],
                c as *const c_void,
                plan.layouts[2],
                c as *mut c_void,
                plan.layouts[2],
                &plan.algos[algo].algo,
                self.workspace.ptr() as *mut c_void,
                WORKSPACE_BYTES,
                stream,
            )?;
        }
        Ok(())
    }
}
