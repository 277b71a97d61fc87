//! cuBLASLt matrix products with an algorithm chosen by timing.
//!
//! `cublasGemmEx` takes the library's first heuristic pick for a shape. For
//! the large prefill GEMMs the heuristic's other candidates are sometimes
//! faster; [`Lt::plan`] lists them for one shape (the same product as
//! [`super::device::Gpu::gemm`]: `C[m, n] = A[m, k] · B[n, k]^T + beta · C`,
//! row-major) and [`Lt::run`] runs one. [`CudaBackend::time_gemm_algorithms`]
//! times them against `cublasGemmEx` for a model's projections (`tandem gpu
//! bench --gemm-algos`).

use std::ffi::c_void;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;

use serde::Serialize;

use super::device::{alloc, Dev, DeviceBuffer, Dtype, Matrix};
use super::{CudaBackend, CudaError};
use crate::backend::{BackendError, ComputeBackend};

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

/// One prefill GEMM shape timed with `cublasGemmEx` (what the backend runs)
/// and with each cuBLASLt heuristic candidate.
#[derive(Debug, Clone, Serialize)]
pub struct GemmResult {
    pub gemm: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// Mean ms of `cublasGemmEx`.
    pub gemm_ex_ms: f64,
    /// Mean ms of each cuBLASLt candidate, the heuristic's order.
    pub lt_ms: Vec<f64>,
    /// Index and ms of the fastest candidate.
    pub lt_best: usize,
    pub lt_best_ms: f64,
}

impl CudaBackend {
    /// Times the four projections of a layer for `m`-token prefill steps of
    /// the backend's model: `cublasGemmEx` against up to 16 cuBLASLt
    /// candidates (mean of 10 runs after 3 warm-up runs each, random inputs).
    pub fn time_gemm_algorithms(&self, m: usize) -> Result<Vec<GemmResult>, BackendError> {
        let cfg = self.config().clone();
        let gpu = &self.gpu;
        gpu.bind()?;
        let (h, q, kv, f) = (
            cfg.hidden_size,
            cfg.num_heads * cfg.head_dim,
            cfg.num_kv_heads * cfg.head_dim,
            cfg.intermediate_size,
        );
        let gate_up_type = if self.tuning.f32_gate_up {
            Dtype::F32
        } else {
            Dtype::Bf16
        };
        let shapes = [
            ("qkv", q + 2 * kv, h, Dtype::F32, 0.0f32),
            ("o", h, q, Dtype::F32, 1.0),
            ("gate_up", 2 * f, h, gate_up_type, 0.0),
            ("down", h, f, Dtype::F32, 1.0),
        ];
        let widest_k = h.max(q).max(f);
        let widest_n = shapes.iter().map(|s| s.1).max().unwrap_or(0);
        let a = alloc(m * widest_k * 2)?;
        let w = alloc(widest_n * widest_k * 2)?;
        let c = alloc(m * widest_n * 4)?;
        gpu.fill_uniform(Dev::at(a.ptr()), m * widest_k, 5, 1.0)?;
        gpu.fill_uniform(Dev::at(w.ptr()), widest_n * widest_k, 6, 0.05)?;
        gpu.fill_f32(Dev::at(c.ptr()), m * widest_n, 0.01)?;
        let lt = Lt::new()?;
        let stream = gpu.cu_stream() as sys::cudaStream_t;
        let time = |run: &dyn Fn() -> Result<(), CudaError>| -> Result<f64, BackendError> {
            for _ in 0..3 {
                run()?;
            }
            let start = gpu.timing_event()?;
            for _ in 0..10 {
                run()?;
            }
            let end = gpu.timing_event()?;
            end.synchronize().map_err(CudaError::from)?;
            Ok(start.elapsed_ms(&end).map_err(CudaError::from)? as f64 / 10.0)
        };
        let mut out = Vec::new();
        for (name, n, k, c_type, beta) in shapes {
            let gemm_ex_ms = time(&|| {
                gpu.gemm(
                    (m, n, k),
                    Matrix {
                        addr: a.ptr(),
                        dtype: Dtype::Bf16,
                    },
                    Dev::at(w.ptr()),
                    Matrix {
                        addr: c.ptr(),
                        dtype: c_type,
                    },
                    beta,
                )
            })?;
            let plan = lt.plan(m, n, k, Dtype::Bf16, c_type, 16)?;
            let mut lt_ms = Vec::new();
            for i in 0..plan.algos.len() {
                // SAFETY: the buffers hold m x k, n x k and m x n elements of
                // the plan's types (sized for the widest shape).
                let ms =
                    time(&|| unsafe { lt.run(&plan, i, a.ptr(), w.ptr(), c.ptr(), beta, stream) });
                // A candidate the library refuses at run time is skipped.
                lt_ms.push(ms.unwrap_or(f64::INFINITY));
            }
            let (lt_best, lt_best_ms) = lt_ms
                .iter()
                .copied()
                .enumerate()
                .min_by(|x, y| x.1.total_cmp(&y.1))
                .unwrap_or((0, f64::INFINITY));
            out.push(GemmResult {
                gemm: name.to_string(),
                m,
                n,
                k,
                gemm_ex_ms,
                lt_ms,
                lt_best,
                lt_best_ms,
            });
        }
        Ok(out)
    }
}
