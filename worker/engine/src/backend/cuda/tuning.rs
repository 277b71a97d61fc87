//! The CUDA backend's settings from the environment and the kernels'
//! compile-time constants, each defined once.
//!
//! [`CudaTuning`] holds every `TANDEM_CUDA_*` environment switch, read once
//! when a backend is created ([`CudaTuning::from_env`]); nothing else in the
//! backend reads the environment. [`KernelTuning`] holds the numbers the host
//! and the kernels must agree on (tile sizes, block shapes, split sizes) and
//! the kernels' tuning knobs: NVRTC gets each as `-DNAME=VALUE`, the kernel
//! sources define none of them (a program compiled without them stops with
//! `#error`, see `kernels/common.cuh`), and the host sizes grids, shared
//! memory and workspaces from the same struct.

use super::CudaError;

/// Defines [`KernelTuning`]: one field per kernel constant, named as the
/// kernels' macro in lower case, with its default and whether
/// `TANDEM_CUDA_DEFINES` may change it.
macro_rules! kernel_constants {
    ($($(#[doc = $doc:literal])* $field:ident = $default:expr, $tunable:literal;)*) => {
        /// The kernels' compile-time constants: each is passed to NVRTC as
        /// `-D` with its name in upper case (`decode_warps` is
        /// `DECODE_WARPS`), and the host computes launch shapes from the same
        /// values, so the two cannot disagree. `TANDEM_CUDA_DEFINES`
        /// overrides the tunable ones ([`KernelTuning::with_defines`]); the
        /// others are part of the kernels' structure.
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct KernelTuning {
            $($(#[doc = $doc])* pub $field: usize,)*
            /// `TANDEM_CUDA_DEFINES` entries naming none of the constants,
            /// passed to NVRTC as they are (`NAME` or `NAME=VALUE`).
            pub extra_defines: Vec<String>,
        }

        impl Default for KernelTuning {
            fn default() -> Self {
                Self {
                    $($field: $default,)*
                    extra_defines: Vec::new(),
                }
            }
        }

        impl KernelTuning {
            /// (macro name, value, tunable) of every constant, in this
            /// file's order.
            fn constants(&self) -> Vec<(String, usize, bool)> {
                vec![$((stringify!($field).to_ascii_uppercase(), self.$field, $tunable),)*]
            }

            /// The constant the kernels call `name`, and whether it is tunable.
            fn constant_mut(&mut self, name: &str) -> Option<(&mut usize, bool)> {
                $(if name == stringify!($field).to_ascii_uppercase() {
                    return Some((&mut self.$field, $tunable));
                })*
                None
            }
        }
    };
}

kernel_constants! {
    /// Float4s of a row one `rms_norm` thread keeps in registers between the
    /// sum and the scaling; the host gives a row `hidden / (4 * RMS_VEC)`
    /// threads (whole warps, 32 to 1024).
    rms_vec = 4, false;
    /// Query heads per KV head the attention kernels handle at most.
    max_group = 8, false;
    /// Largest head dimension the kernels handle.
    max_head_dim = 256, false;
    /// Warps of a decode-attention block.
    decode_warps = 8, false;
    /// Positions of one split of the older decode attention
    /// (`decode_attention_{PL}`): the host gives it every split the longest
    /// context needs.
    decode_partition = 64, false;
    /// Fewest positions a split of `decode_attention_v2` takes: a sequence
    /// uses `min(splits, max(1, ctx / DECODE_MIN_CHUNK))` splits, and the
    /// host plans at most `max_model_len / DECODE_MIN_CHUNK`.
    decode_min_chunk = 128, true;
    /// Positions a `decode_attention_v2` block loads in one round, before
    /// using any of them (when registers allow).
    decode_v2_round = 128, true;
    /// Query rows of a tile of the scalar prefill attention (`PF_Q`; its
    /// blocks have 8 threads a row), and the tile the host plans the tile
    /// count for.
    pf_q = 16, false;
    /// Keys a tile of the scalar prefill attention stages in shared memory.
    pf_k = 32, false;
    /// Keys a tile of the mma.sync prefill attention (double-buffered in
    /// shared memory).
    tc_k = 64, false;
    /// Warps of an mma.sync prefill-attention block at most (16 query rows
    /// each): a tile has `16 * max(1, TC_WARPS / group)` rows.
    tc_warps = 8, false;
    /// Keys a tile of the wgmma prefill attention: the KV pool's TMA boxes
    /// must tile it.
    wg_k = 64, false;
    /// Blocks of the wgmma prefill attention an SM holds (its launch
    /// bounds: 2 caps it at 128 registers, faster at 4k tokens than 1 block
    /// of up to 255 registers).
    wg_min_blocks = 2, true;
    /// 1: a wgmma prefill grid that fits the GPU at once pairs long and
    /// short query tiles on an SM; 0: tiles in order.
    wg_zigzag = 1, true;
    /// How far (log2 units) a row's running maximum may trail a tile's in
    /// the wgmma prefill attention before its output and sum are rescaled
    /// (0: on every increase).
    wg_max_slack = 8, true;
    /// Warps of a fused-projection (`gemv_*`) block.
    gemv_warps = 8, false;
    /// 16-byte loads of each of a pair of weight rows a `gemv_*` lane issues
    /// at once.
    gemv_unroll = 4, true;
    /// Weight matrices of at most this many bytes have the rows of a
    /// `gemv_*` warp's first pair prefetched into L2 before the kernel waits
    /// for the previous one.
    gemv_prefetch_bytes = 16 << 20, true;
    /// Threads of a `sample_rows` block (one block a row).
    sample_threads = 1024, false;
    /// 32-bit words of one row's sampling rule
    /// ([`crate::backend::DeviceSampling::to_words`]).
    sampling_words = 5, false;
}

impl KernelTuning {
    /// The defaults with `TANDEM_CUDA_DEFINES`'s overrides
    /// (whitespace-separated `NAME=VALUE`, e.g. `GEMV_UNROLL=8`; `NAME`
    /// alone is `NAME=1`, as for the preprocessor): a tunable constant takes
    /// the value (an integer), a name that is none of the constants is
    /// passed to NVRTC as it is, and the structural constants cannot be
    /// changed (the host's shapes assume them).
    pub fn with_defines(defines: &str) -> Result<Self, CudaError> {
        let mut tuning = Self::default();
        for define in defines.split_whitespace() {
            let (name, value) = define.split_once('=').unwrap_or((define, "1"));
            let Some((slot, tunable)) = tuning.constant_mut(name) else {
                tuning.extra_defines.push(define.to_string());
                continue;
            };
            let bad =
                |why: &str| CudaError::Option(format!("TANDEM_CUDA_DEFINES: {define}: {why}"));
            if !tunable {
                return Err(bad("a structural constant of the kernels, not tunable"));
            }
            *slot = value
                .parse()
                .map_err(|_| bad("the value must be a non-negative integer"))?;
        }
        Ok(tuning)
    }

    /// The NVRTC options that define every constant, then the extra defines.
    pub fn nvrtc_defines(&self) -> Vec<String> {
        self.constants()
            .into_iter()
            .map(|(name, value, _)| format!("-D{name}={value}"))
            .chain(self.extra_defines.iter().map(|d| format!("-D{d}")))
            .collect()
    }

    /// The names `TANDEM_CUDA_DEFINES` may set.
    pub fn tunable_names(&self) -> Vec<String> {
        self.constants()
            .into_iter()
            .filter(|c| c.2)
            .map(|c| c.0)
            .collect()
    }
}

/// Every `TANDEM_CUDA_*` environment switch of the CUDA backend, read once
/// when a backend is created ([`CudaTuning::from_env`]). They are for
/// comparing code paths and kernel variants on a GPU machine without
/// rebuilding; the defaults are what serving runs. A boolean switch is on
/// for `1`, `on` or `true`, off for `0`, `off` or `false`, and keeps its
/// default for anything else.
///
/// | variable | field | default |
/// | --- | --- | --- |
/// | `TANDEM_CUDA_FUSED_GEMV` | [`fused_gemv`](Self::fused_gemv) | on |
/// | `TANDEM_CUDA_F32_GATE_UP` | [`f32_gate_up`](Self::f32_gate_up) | on |
/// | `TANDEM_CUDA_PDL` | [`pdl`](Self::pdl) | on (compute capability 9.0 and newer) |
/// | `TANDEM_CUDA_WGMMA` | [`wgmma`](Self::wgmma) | on (`sm_90a`) |
/// | `TANDEM_CUDA_GEMV_MAX_BLOCKS` | [`gemv_max_blocks`](Self::gemv_max_blocks) | unset: two blocks per SM |
/// | `TANDEM_CUDA_GEMV_RESIDENT` | [`gemv_resident`](Self::gemv_resident) | 2 |
/// | `TANDEM_CUDA_DEFINES` | [`kernels`](Self::kernels) | none |
/// | `TANDEM_CUDA_INCLUDE` | [`include_dir`](Self::include_dir) | `$CUDA_HOME/include`, `$CUDA_PATH/include`, else `/usr/local/cuda/include` |
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaTuning {
    /// `TANDEM_CUDA_FUSED_GEMV` (default on): steps of 1, 2 or 4 tokens run
    /// the fused matrix-vector kernels (`gemv_*`: RMSNorm + QKV + bias +
    /// RoPE + KV write, output projection + residual, RMSNorm + gate/up +
    /// SiLU, down projection + residual, and the final norm + output head);
    /// off, every projection is a cuBLAS GEMM.
    pub fused_gemv: bool,
    /// `TANDEM_CUDA_F32_GATE_UP` (default on): multi-token steps keep the
    /// gate/up GEMM's output in f32 up to SiLU·mul instead of rounding it to
    /// bf16. Rounding them was the largest single share of the default
    /// model's logits error (2.28e-2 vs f32 for the design computed on the
    /// CPU, 1.53e-2 without it); keeping f32 costs about 1 ms of an 8B
    /// 4k-token prefill (H100) and twice the gate/up workspace.
    pub f32_gate_up: bool,
    /// `TANDEM_CUDA_PDL` (default on): programmatic dependent launches for
    /// the kernels that support them (compute capability 9.0 and newer; off
    /// elsewhere whatever the switch): each decode kernel starts, and
    /// prefetches its weights, while the previous one finishes.
    pub pdl: bool,
    /// `TANDEM_CUDA_WGMMA` (default on): multi-token steps use the Hopper
    /// (wgmma, TMA) prefill attention where it is compiled (`sm_90a`) and
    /// fits the model (head dim 64 or 128, even GQA group) and the KV pool;
    /// off, the mma.sync kernel.
    pub wgmma: bool,
    /// `TANDEM_CUDA_GEMV_MAX_BLOCKS` (default unset: two blocks per SM): at
    /// most this many blocks in a fused-projection grid, for measuring and
    /// checking (one block makes each warp loop over many row pairs). A
    /// value that is not a number counts as unset.
    pub gemv_max_blocks: Option<usize>,
    /// `TANDEM_CUDA_GEMV_RESIDENT` (default 2; `0` or a value that is not a
    /// number: no limit): with early launch, the fused projections ask for
    /// enough shared memory that at most this many of their blocks share an
    /// SM, so the next kernel's blocks spread evenly as the running one's
    /// leave. 8B batch-1 decode on H200: 4.90 ms a step without early
    /// launch, 6.59 with it and no limit, 4.82 with it and this limit
    /// (SmolLM2-135M: 0.575 vs 0.549 ms).
    pub gemv_resident: Option<usize>,
    /// `TANDEM_CUDA_DEFINES` (default none): overrides of the kernels'
    /// tunable constants (whitespace-separated `NAME=VALUE`, e.g.
    /// `GEMV_UNROLL=8`; see [`KernelTuning::with_defines`]) and extra
    /// defines for NVRTC: kernel variants measured without rebuilding.
    pub kernels: KernelTuning,
    /// `TANDEM_CUDA_INCLUDE`: the directory holding `cuda_bf16.h` for NVRTC;
    /// unset, `$CUDA_HOME/include`, `$CUDA_PATH/include`, else
    /// `/usr/local/cuda/include`.
    pub include_dir: String,
}

impl Default for CudaTuning {
    /// What a backend runs with when no variable is set.
    fn default() -> Self {
        Self::from_vars(|_| None).expect("the defaults are valid")
    }
}

impl CudaTuning {
    /// Reads every switch from the process environment (once per backend).
    pub fn from_env() -> Result<Self, CudaError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The switches from `var` (a variable's value, `None` when unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, CudaError> {
        let switch = |name: &str, default: bool| match var(name).as_deref() {
            Some("1") | Some("on") | Some("true") => true,
            Some("0") | Some("off") | Some("false") => false,
            _ => default,
        };
        let include_dir = var("TANDEM_CUDA_INCLUDE")
            .or_else(|| var("CUDA_HOME").map(|home| format!("{home}/include")))
            .or_else(|| var("CUDA_PATH").map(|home| format!("{home}/include")))
            .unwrap_or_else(|| "/usr/local/cuda/include".to_string());
        Ok(Self {
            fused_gemv: switch("TANDEM_CUDA_FUSED_GEMV", true),
            f32_gate_up: switch("TANDEM_CUDA_F32_GATE_UP", true),
            pdl: switch("TANDEM_CUDA_PDL", true),
            wgmma: switch("TANDEM_CUDA_WGMMA", true),
            gemv_max_blocks: var("TANDEM_CUDA_GEMV_MAX_BLOCKS").and_then(|v| v.parse().ok()),
            gemv_resident: match var("TANDEM_CUDA_GEMV_RESIDENT") {
                Some(v) => v.parse::<usize>().ok().filter(|&n| n > 0),
                None => Some(GEMV_RESIDENT),
            },
            kernels: KernelTuning::with_defines(&var("TANDEM_CUDA_DEFINES").unwrap_or_default())?,
            include_dir,
        })
    }
}

/// Fused-projection blocks an SM holds at once when kernels launch early,
/// unless `TANDEM_CUDA_GEMV_RESIDENT` says otherwise: as many as the grid has
/// per SM (at most two per SM, see `GemvLaunch`).
const GEMV_RESIDENT: usize = 2;

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(set: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            set.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn switches_default_when_unset_or_unrecognised_and_follow_the_words() {
        let d = CudaTuning::default();
        assert!(d.fused_gemv && d.f32_gate_up && d.pdl && d.wgmma);
        assert_eq!(d.gemv_max_blocks, None);
        assert_eq!(d.gemv_resident, Some(2));
        assert_eq!(d.kernels, KernelTuning::default());
        assert_eq!(d.include_dir, "/usr/local/cuda/include");
        let t = CudaTuning::from_vars(vars(&[
            ("TANDEM_CUDA_FUSED_GEMV", "off"),
            ("TANDEM_CUDA_F32_GATE_UP", "0"),
            ("TANDEM_CUDA_PDL", "maybe"),
            ("TANDEM_CUDA_WGMMA", "false"),
            ("TANDEM_CUDA_GEMV_MAX_BLOCKS", "1"),
            ("TANDEM_CUDA_GEMV_RESIDENT", "0"),
            ("CUDA_HOME", "/opt/cuda"),
        ]))
        .unwrap();
        assert!(!t.fused_gemv && !t.f32_gate_up && t.pdl && !t.wgmma);
        assert_eq!(t.gemv_max_blocks, Some(1));
        assert_eq!(t.gemv_resident, None);
        assert_eq!(t.include_dir, "/opt/cuda/include");
        let t = CudaTuning::from_vars(vars(&[
            ("TANDEM_CUDA_INCLUDE", "/x"),
            ("CUDA_HOME", "/opt/cuda"),
            ("TANDEM_CUDA_GEMV_RESIDENT", "3"),
            ("TANDEM_CUDA_GEMV_MAX_BLOCKS", "many"),
        ]))
        .unwrap();
        assert_eq!(t.include_dir, "/x");
        assert_eq!(t.gemv_resident, Some(3));
        assert_eq!(t.gemv_max_blocks, None);
    }

    #[test]
    fn defines_override_tunables_pass_unknown_names_and_refuse_structure() {
        let k =
            KernelTuning::with_defines("GEMV_UNROLL=8  WG_ZIGZAG=0 MY_FLAG DECODE_MIN_CHUNK=64")
                .unwrap();
        assert_eq!((k.gemv_unroll, k.wg_zigzag, k.decode_min_chunk), (8, 0, 64));
        assert_eq!(k.extra_defines, ["MY_FLAG"]);
        let d = k.nvrtc_defines();
        assert!(d.contains(&"-DGEMV_UNROLL=8".to_string()), "{d:?}");
        assert!(d.contains(&"-DDECODE_WARPS=8".to_string()), "{d:?}");
        assert_eq!(d.last().unwrap(), "-DMY_FLAG");
        // Every constant once: no name defined twice.
        let names: std::collections::HashSet<_> =
            d.iter().map(|o| o.split('=').next().unwrap()).collect();
        assert_eq!(names.len(), d.len());
        let err = KernelTuning::with_defines("DECODE_WARPS=4").unwrap_err();
        assert!(err.to_string().contains("DECODE_WARPS=4"), "{err}");
        let err = KernelTuning::with_defines("GEMV_UNROLL=lots").unwrap_err();
        assert!(err.to_string().contains("integer"), "{err}");
        assert!(KernelTuning::default()
            .tunable_names()
            .contains(&"GEMV_PREFETCH_BYTES".to_string()));
    }

    /// Every constant the kernels require is one the host defines, and the
    /// other way round.
    #[test]
    fn the_kernels_require_exactly_the_constants_the_host_defines() {
        let required: std::collections::BTreeSet<String> = super::super::kernels::KERNEL_PROGRAM
            .lines()
            .filter_map(|l| l.strip_prefix("#ifndef "))
            .map(str::to_string)
            .collect();
        let defined: std::collections::BTreeSet<String> = KernelTuning::default()
            .constants()
            .into_iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(required, defined);
    }
}
